//! The lifecycles the agent records, as types. Each stored status keeps the exact lowercase
//! string it always had in SQLite and in the API; reading a value this agent does not know is
//! an error that names the column and the value, never a silent default.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A stored status this agent does not know (written by a newer miren, or by hand).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown value `{value}` in column {column}; this agent does not know that state \
     (was the state store written by a newer miren? run that version, or fix the row)"
)]
pub struct UnknownStatus {
    pub column: &'static str,
    pub value: String,
}

/// Declares a status enum stored in one SQLite column: `as_str`, `Display` and a `FromStr`
/// that rejects unknown values (the store's SQL conversion, in `store/sql.rs`, uses both).
macro_rules! stored_status {
    (
        $(#[$meta:meta])*
        $name:ident in $column:literal {
            $($(#[$vmeta:meta])* $variant:ident => $text:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            /// Every state, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];
            /// The `table.column` it is stored in.
            pub const COLUMN: &'static str = $column;

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(self.as_str())
            }
        }

        // On the wire as in the store: the same string.
        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
            }
        }

        impl FromStr for $name {
            type Err = UnknownStatus;
            fn from_str(s: &str) -> Result<Self, UnknownStatus> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(UnknownStatus {
                        column: $column,
                        value: other.to_string(),
                    }),
                }
            }
        }
    };
}

stored_status! {
    /// Lifecycle of a disk row. `Creating` and `Deleting` mark operations in flight: after a
    /// crash, a creating disk is rolled back and a deleting one is finished.
    DiskStatus in "disks.status" {
        Creating => "creating",
        Ready => "ready",
        Resizing => "resizing",
        Deleting => "deleting",
        Restoring => "restoring",
        Error => "error",
    }
}

/// Which operations a disk's state allows (youki's `can_*` on its container states): the one
/// answer the store's transactions and the services ask.
impl DiskStatus {
    /// A delete may start, or start again after a crash; a resize or failed create is undone.
    pub fn can_delete(self) -> bool {
        matches!(
            self,
            DiskStatus::Ready | DiskStatus::Error | DiskStatus::Resizing | DiskStatus::Deleting
        )
    }
    /// A resize may start, or a cut-short one be retried.
    pub fn can_resize(self) -> bool {
        matches!(self, DiskStatus::Ready | DiskStatus::Resizing)
    }
    /// A sandbox may lease it. Not while resizing: ext4 may have to grow unmounted on hosts
    /// that forbid online growth.
    pub fn can_lease(self) -> bool {
        self == DiskStatus::Ready
    }
    /// A snapshot may replace its contents.
    pub fn can_restore(self) -> bool {
        matches!(self, DiskStatus::Ready | DiskStatus::Error)
    }
    /// It may be backed up.
    pub fn can_back_up(self) -> bool {
        self == DiskStatus::Ready
    }
}

stored_status! {
    /// A sandbox row: it exists (`Created`), or a run or delete is under way and may have
    /// been cut short.
    SandboxStatus in "sandboxes.status" {
        Creating => "creating",
        Created => "created",
        Deleting => "deleting",
    }
}

impl SandboxStatus {
    /// A run or delete was started and not finished: reconcile must finish or undo it.
    pub fn in_flight(self) -> bool {
        matches!(self, SandboxStatus::Creating | SandboxStatus::Deleting)
    }
}

stored_status! {
    /// A network endpoint row.
    EndpointStatus in "endpoints.status" {
        Creating => "creating",
        Ready => "ready",
        Deleting => "deleting",
        Failed => "failed",
    }
}

impl EndpointStatus {
    /// A create or delete was started and not finished (the agent died in between).
    pub fn in_flight(self) -> bool {
        matches!(self, EndpointStatus::Creating | EndpointStatus::Deleting)
    }

    /// The endpoint is on its way out and must not be counted or reused.
    pub fn is_going(self) -> bool {
        self == EndpointStatus::Deleting
    }
}

stored_status! {
    /// An app's last deploy.
    AppStatus in "apps.status" {
        Deploying => "deploying",
        Running => "running",
        Error => "error",
    }
}

impl AppStatus {
    /// A deploy was started and not finished (the agent died in between): resume it.
    pub fn needs_work(self) -> bool {
        self == AppStatus::Deploying
    }
    /// Its services run, so they can be restarted (for new addon variables, or by hand).
    pub fn can_restart(self) -> bool {
        self == AppStatus::Running
    }
}

stored_status! {
    /// Where a redeploy's switch of one service stands (`core/apps/switch.rs`).
    SwitchPhase in "service_switches.phase" {
        /// Recorded before the next sandbox starts; the previous one serves. Resumed by
        /// removing the next one.
        Starting => "starting",
        /// The next sandbox is healthy; its ports are being switched to it. Resumed by
        /// finishing the switch.
        Switching => "switching",
        /// The next sandbox serves; the previous one drains. Resumed by removing it.
        Draining => "draining",
    }
}

stored_status! {
    /// Where an addon is in its life. `deleted` is the absence of the row.
    AddonStatus in "addons.status" {
        Pending => "pending",
        Provisioning => "provisioning",
        Active => "active",
        Error => "error",
        Deprovisioning => "deprovisioning",
    }
}

impl AddonStatus {
    /// A step is owed: the driver resumes an addon in this state.
    pub fn needs_work(self) -> bool {
        matches!(
            self,
            AddonStatus::Pending | AddonStatus::Provisioning | AddonStatus::Deprovisioning
        )
    }

    /// Where a provisioning step is owed (not yet started, or cut short).
    pub const PROVISIONING_OWED: &'static [AddonStatus] =
        &[AddonStatus::Pending, AddonStatus::Provisioning];

    pub fn needs_provisioning(self) -> bool {
        AddonStatus::PROVISIONING_OWED.contains(&self)
    }

    /// The addon counts as a member of its shared server (keeps it alive).
    pub fn is_member(self) -> bool {
        self != AddonStatus::Error
    }

    /// The statuses in which an addon is a member, in declaration order.
    pub fn members() -> impl Iterator<Item = AddonStatus> {
        AddonStatus::ALL.iter().copied().filter(|s| s.is_member())
    }
}

stored_status! {
    /// A shared addon server.
    ServerStatus in "addon_servers.status" {
        Provisioning => "provisioning",
        Active => "active",
        Deleting => "deleting",
    }
}

impl ServerStatus {
    /// It answers its members (provisioned, not being removed).
    pub fn serves(self) -> bool {
        self == ServerStatus::Active
    }
    /// It is being removed: nobody may join it until that ends.
    pub fn is_going(self) -> bool {
        self == ServerStatus::Deleting
    }
}

/// A sandbox as the API shows it: its row and its supervisor's report together. Not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    Creating,
    Running,
    Exited,
    Failed,
    Deleting,
}

impl SandboxState {
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Creating => "creating",
            SandboxState::Running => "running",
            SandboxState::Exited => "exited",
            SandboxState::Failed => "failed",
            SandboxState::Deleting => "deleting",
        }
    }

    /// The sandbox can only come back by being replaced (its supervisor gave up or is gone).
    pub fn is_failed(self) -> bool {
        self == SandboxState::Failed
    }

    pub fn is_running(self) -> bool {
        self == SandboxState::Running
    }
}

impl fmt::Display for SandboxState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_each_disk_state_allows() {
        use DiskStatus::*;
        let allowed = |f: fn(DiskStatus) -> bool| -> Vec<DiskStatus> {
            DiskStatus::ALL.iter().copied().filter(|s| f(*s)).collect()
        };
        assert_eq!(
            allowed(DiskStatus::can_delete),
            [Ready, Resizing, Deleting, Error]
        );
        assert_eq!(allowed(DiskStatus::can_resize), [Ready, Resizing]);
        assert_eq!(allowed(DiskStatus::can_lease), [Ready]);
        assert_eq!(allowed(DiskStatus::can_restore), [Ready, Error]);
        assert_eq!(allowed(DiskStatus::can_back_up), [Ready]);
    }

    #[test]
    fn stored_statuses_travel_as_their_stored_strings() {
        for s in AddonStatus::ALL {
            let json = serde_json::to_string(s).unwrap();
            assert_eq!(json, format!("\"{}\"", s.as_str()));
            assert_eq!(serde_json::from_str::<AddonStatus>(&json).unwrap(), *s);
        }
        assert_eq!(
            serde_json::to_string(&AppStatus::Running).unwrap(),
            "\"running\""
        );
        assert_eq!(
            serde_json::from_str::<EndpointStatus>("\"ready\"").unwrap(),
            EndpointStatus::Ready
        );
        let err = serde_json::from_str::<AppStatus>("\"sleeping\"").unwrap_err();
        assert!(err.to_string().contains("sleeping"), "{err}");
    }
    #[test]
    fn the_stored_strings_are_the_ones_on_disk() {
        // The rows written by earlier versions hold these exact strings.
        let stored: Vec<&str> = DiskStatus::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            stored,
            [
                "creating",
                "ready",
                "resizing",
                "deleting",
                "restoring",
                "error"
            ]
        );
        let stored: Vec<&str> = AddonStatus::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(
            stored,
            [
                "pending",
                "provisioning",
                "active",
                "error",
                "deprovisioning"
            ]
        );
        assert_eq!(SandboxStatus::Created.as_str(), "created");
        assert_eq!(EndpointStatus::Failed.as_str(), "failed");
        assert_eq!(AppStatus::Deploying.as_str(), "deploying");
        assert_eq!(ServerStatus::Deleting.as_str(), "deleting");
    }

    #[test]
    fn from_str_matches_as_str() {
        for s in AddonStatus::ALL {
            assert_eq!(s.as_str().parse::<AddonStatus>(), Ok(*s));
        }
        assert_eq!(
            "Ready".parse::<DiskStatus>(),
            Err(UnknownStatus {
                column: "disks.status",
                value: "Ready".into()
            })
        );
    }

    #[test]
    fn addon_questions() {
        let working: Vec<_> = AddonStatus::ALL
            .iter()
            .filter(|s| s.needs_work())
            .map(|s| s.as_str())
            .collect();
        assert_eq!(working, ["pending", "provisioning", "deprovisioning"]);
        let owed: Vec<_> = AddonStatus::ALL
            .iter()
            .filter(|s| s.needs_provisioning())
            .map(|s| s.as_str())
            .collect();
        assert_eq!(owed, ["pending", "provisioning"]);
        let members: Vec<_> = AddonStatus::members().map(|s| s.as_str()).collect();
        assert_eq!(
            members,
            ["pending", "provisioning", "active", "deprovisioning"]
        );
    }

    #[test]
    fn display_honours_width_like_a_string() {
        // The CLI's tables pad these with `{:<9}`.
        assert_eq!(format!("{:<9}|", SandboxState::Running), "running  |");
        assert_eq!(format!("{:<9}|", DiskStatus::Ready), "ready    |");
    }

    #[test]
    fn sandbox_state_serializes_as_before() {
        assert_eq!(
            serde_json::to_string(&SandboxState::Exited).unwrap(),
            "\"exited\""
        );
        for s in [
            SandboxState::Creating,
            SandboxState::Running,
            SandboxState::Exited,
            SandboxState::Failed,
            SandboxState::Deleting,
        ] {
            assert_eq!(serde_json::to_string(&s).unwrap(), format!("\"{s}\""));
        }
    }
}
