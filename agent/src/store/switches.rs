//! Redeploy switches in flight, one row per (app, service): the phase is recorded before the
//! step it names is taken, so an agent killed mid-switch finishes (or undoes) it at start
//! from this row (`core/apps/switch.rs`). The row goes once the previous sandbox is removed.
//!
//! Committed like sandbox rows (`volatile`): a switch is about sandboxes, which a host crash
//! ends anyway; a process crash loses no commit.

use rusqlite::{params, OptionalExtension, TransactionBehavior};

use crate::core::status::SwitchPhase;
use crate::store::{Store, StoreResult};
use crate::util::now_rfc3339;

pub const MIGRATION_SWITCHES: &str = "CREATE TABLE service_switches (
    app TEXT NOT NULL,
    service TEXT NOT NULL,
    phase TEXT NOT NULL,
    previous_sandbox TEXT NOT NULL,
    next_sandbox TEXT,
    started_at TEXT NOT NULL,
    PRIMARY KEY (app, service)
);";

/// One service's switch in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwitchRow {
    pub app: String,
    pub service: String,
    pub phase: SwitchPhase,
    /// The sandbox that served when the switch began.
    pub previous_sandbox: String,
    /// Known once the next sandbox runs.
    pub next_sandbox: Option<String>,
    pub started_at: String,
}

const COLUMNS: &str = "app, service, phase, previous_sandbox, next_sandbox, started_at";

fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SwitchRow> {
    Ok(SwitchRow {
        app: r.get(0)?,
        service: r.get(1)?,
        phase: r.get(2)?,
        previous_sandbox: r.get(3)?,
        next_sandbox: r.get(4)?,
        started_at: r.get(5)?,
    })
}

impl Store {
    /// Records a switch in `starting` (replacing a finished or abandoned one's row).
    pub fn begin_switch(&self, app: &str, service: &str, previous: &str) -> StoreResult<()> {
        self.volatile(|conn| {
            conn.execute(
                "INSERT OR REPLACE INTO service_switches
                 (app, service, phase, previous_sandbox, next_sandbox, started_at)
                 VALUES (?1, ?2, ?3, ?4, NULL, ?5)",
                params![app, service, SwitchPhase::Starting, previous, now_rfc3339()],
            )?;
            Ok(())
        })
    }

    pub fn set_switch_phase(
        &self,
        app: &str,
        service: &str,
        phase: SwitchPhase,
        next: Option<&str>,
    ) -> StoreResult<()> {
        self.volatile(|conn| {
            conn.execute(
                "UPDATE service_switches SET phase = ?3, next_sandbox = COALESCE(?4, next_sandbox)
                 WHERE app = ?1 AND service = ?2",
                params![app, service, phase, next],
            )?;
            Ok(())
        })
    }

    pub fn end_switch(&self, app: &str, service: &str) -> StoreResult<()> {
        self.volatile(|conn| {
            conn.execute(
                "DELETE FROM service_switches WHERE app = ?1 AND service = ?2",
                params![app, service],
            )?;
            Ok(())
        })
    }

    /// Ends the switch that retired `previous`, not a later one of the same service.
    pub fn end_switch_of(&self, app: &str, service: &str, previous: &str) -> StoreResult<()> {
        self.volatile(|conn| {
            conn.execute(
                "DELETE FROM service_switches
                 WHERE app = ?1 AND service = ?2 AND previous_sandbox = ?3",
                params![app, service, previous],
            )?;
            Ok(())
        })
    }

    pub fn switch_of(&self, app: &str, service: &str) -> StoreResult<Option<SwitchRow>> {
        self.read(|conn| {
            Ok(conn
                .query_row(
                    &format!(
                        "SELECT {COLUMNS} FROM service_switches WHERE app = ?1 AND service = ?2"
                    ),
                    params![app, service],
                    from_row,
                )
                .optional()?)
        })
    }

    pub fn switches(&self) -> StoreResult<Vec<SwitchRow>> {
        self.read(|conn| {
            let mut stmt = conn.prepare(&format!(
                "SELECT {COLUMNS} FROM service_switches ORDER BY app, service"
            ))?;
            let rows = stmt.query_map([], from_row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
    }

    /// The switch's ownership step, in one transaction: the serving sandbox becomes the
    /// retiring one and the next one the serving one, and the phase `draining`. Repeating it
    /// (no next sandbox left) only sets the phase.
    pub fn promote_next_sandbox(&self, app: &str, service: &str) -> StoreResult<()> {
        self.volatile(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let of = |kind: &str| {
                tx.query_row(
                    "SELECT id, name FROM sandboxes
                     WHERE owner_kind = ?1 AND owner_app = ?2 AND owner_part = ?3",
                    params![kind, app, service],
                    |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
                )
                .optional()
            };
            let (next, serving) = (of("app-next")?, of("app")?);
            if let (Some((next_id, next_name)), Some((serving_id, serving_name))) =
                (&next, &serving)
            {
                // Names are display only, but people and scripts use them: the serving
                // sandbox keeps the service's name (names are unique, hence the detour).
                for (id, name) in [
                    (serving_id, &format!("~{serving_id}")),
                    (next_id, serving_name),
                    (serving_id, next_name),
                ] {
                    tx.execute(
                        "UPDATE sandboxes SET name = ?2 WHERE id = ?1",
                        params![id, name],
                    )?;
                }
            }
            if next.is_some() {
                tx.execute(
                    "UPDATE sandboxes SET owner_kind = 'app-retiring'
                     WHERE owner_kind = 'app' AND owner_app = ?1 AND owner_part = ?2",
                    params![app, service],
                )?;
                tx.execute(
                    "UPDATE sandboxes SET owner_kind = 'app'
                     WHERE owner_kind = 'app-next' AND owner_app = ?1 AND owner_part = ?2",
                    params![app, service],
                )?;
            }
            tx.execute(
                "UPDATE service_switches SET phase = ?3 WHERE app = ?1 AND service = ?2",
                params![app, service, SwitchPhase::Draining],
            )?;
            tx.commit()?;
            Ok(())
        })
    }
}
