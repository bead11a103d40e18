//! How an [`Owner`] is stored: three nullable columns `owner_kind`, `owner_app`, `owner_part`
//! on `sandboxes` and `disks` (migration 8). No owner is three NULLs.

use crate::core::owner::ReplacingRole;
use crate::store::Owner;

/// `(owner_kind, owner_app, owner_part)` for an owner.
pub(crate) fn owner_columns(owner: &Owner) -> (&'static str, &str, &str) {
    match owner {
        Owner::App { app, service } => ("app", app, service),
        Owner::Addon { app, kind } => ("addon", app, kind),
        Owner::Shared { kind } => ("shared", "", kind),
        Owner::Replacing {
            app,
            service,
            role: ReplacingRole::Next,
        } => ("app-next", app, service),
        Owner::Replacing {
            app,
            service,
            role: ReplacingRole::Retiring,
        } => ("app-retiring", app, service),
        // Sidecars of other owners are not recorded (only addon servers have them).
        Owner::Sidecar { server } => match server.as_ref() {
            Owner::Shared { kind } => ("shared-sidecar", "", kind),
            Owner::Addon { app, kind } => ("addon-sidecar", app, kind),
            _ => ("sidecar", "", ""),
        },
    }
}

/// The owner recorded in a row's columns; None for no owner (or a kind this agent does not
/// know, which it then treats as unowned).
pub(crate) fn owner_from_columns(
    kind: Option<String>,
    app: Option<String>,
    part: Option<String>,
) -> Option<Owner> {
    let (app, part) = (app.unwrap_or_default(), part.unwrap_or_default());
    match kind.as_deref()? {
        "app" => Some(Owner::App { app, service: part }),
        "addon" => Some(Owner::Addon { app, kind: part }),
        "shared" => Some(Owner::Shared { kind: part }),
        "app-next" => Some(Owner::replacing(&app, &part, ReplacingRole::Next)),
        "app-retiring" => Some(Owner::replacing(&app, &part, ReplacingRole::Retiring)),
        "addon-sidecar" => Some(Owner::sidecar_of(&Owner::Addon { app, kind: part })),
        "shared-sidecar" => Some(Owner::sidecar_of(&Owner::Shared { kind: part })),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_round_trip_through_their_columns() {
        for owner in [
            Owner::app("shop"),
            Owner::service("shop", "web"),
            Owner::replacing("shop", "web", ReplacingRole::Next),
            Owner::replacing("shop", "web", ReplacingRole::Retiring),
            Owner::Addon {
                app: "shop".into(),
                kind: "miren-postgresql".into(),
            },
            Owner::Shared {
                kind: "miren-postgresql".into(),
            },
            Owner::sidecar_of(&Owner::Addon {
                app: "shop".into(),
                kind: "miren-postgresql".into(),
            }),
            Owner::sidecar_of(&Owner::Shared {
                kind: "miren-postgresql".into(),
            }),
        ] {
            let (kind, app, part) = owner_columns(&owner);
            let back = owner_from_columns(Some(kind.into()), Some(app.into()), Some(part.into()));
            assert_eq!(back, Some(owner));
        }
        assert_eq!(owner_from_columns(None, None, None), None);
    }
}
