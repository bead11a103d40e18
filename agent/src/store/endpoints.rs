//! Network endpoints and the IPAM cursor. A host crash ends every endpoint, so their commits
//! are not forced to disk (see [`Store::volatile`]).

use std::net::Ipv4Addr;

use rusqlite::{params, OptionalExtension, TransactionBehavior};

use crate::core::status::EndpointStatus;
use crate::store::error::{StoreError, StoreResult};
use crate::store::Store;

/// A network endpoint as recorded: `creating` and `deleting` mark operations in flight.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointRow {
    pub owner: String,
    pub app: String,
    pub ip: Ipv4Addr,
    pub allow_from: Vec<String>,
    /// Published ports as `host_ip:host_port:port`.
    pub publish: Vec<String>,
    pub status: EndpointStatus,
    pub owner_pid: Option<i64>,
    pub owner_start_time: Option<i64>,
    pub created_at: String,
}

const ENDPOINT_COLUMNS: &str =
    "owner, app, ip, allow_from, publish, status, owner_pid, owner_start_time, created_at";

fn endpoint_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<EndpointRow> {
    let ip: String = row.get(2)?;
    let list = |i: usize| -> rusqlite::Result<Vec<String>> {
        let text: String = row.get(i)?;
        Ok(serde_json::from_str(&text).unwrap_or_default())
    };
    Ok(EndpointRow {
        owner: row.get(0)?,
        app: row.get(1)?,
        ip: ip.parse().map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(2, rusqlite::types::Type::Text, Box::new(e))
        })?,
        allow_from: list(3)?,
        publish: list(4)?,
        status: row.get(5)?,
        owner_pid: row.get(6)?,
        owner_start_time: row.get(7)?,
        created_at: row.get(8)?,
    })
}

impl Store {
    /// Allocates an address and records the endpoint as `creating`, in one transaction: an
    /// address is never handed out twice, and allocation continues after the last address
    /// handed out, so a just-released address is not reused while caches may remember it.
    /// `candidates` gives the addresses to try, in order, after the last one handed out;
    /// each is looked up in the `ip` index until one is free, so a start reads a row or two,
    /// not every endpoint (it read them all: 2 ms of each start at 1000, bench/density).
    pub fn insert_creating_endpoint<I: Iterator<Item = Ipv4Addr>>(
        &self,
        endpoint: &EndpointRow,
        subnet_key: &str,
        candidates: impl FnOnce(Option<Ipv4Addr>) -> I,
    ) -> StoreResult<EndpointRow> {
        self.volatile(|conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let existing = tx
                .query_row(
                    &format!("SELECT {ENDPOINT_COLUMNS} FROM endpoints WHERE owner = ?1"),
                    [&endpoint.owner],
                    endpoint_from_row,
                )
                .optional()?;
            if let Some(existing) = existing {
                return Err(StoreError::EndpointExists {
                    owner: existing.owner,
                    ip: existing.ip,
                    app: existing.app,
                });
            }
            let last: Option<Ipv4Addr> = tx
                .query_row(
                    "SELECT last_ip FROM ipam WHERE subnet = ?1",
                    [subnet_key],
                    |r| r.get::<_, String>(0),
                )
                .optional()?
                .and_then(|ip| ip.parse().ok());
            let free = {
                let mut taken = tx.prepare("SELECT 1 FROM endpoints WHERE ip = ?1")?;
                let mut free = None;
                for ip in candidates(last) {
                    if !taken.exists([ip.to_string()])? {
                        free = Some(ip);
                        break;
                    }
                }
                free
            };
            let Some(ip) = free else {
                let in_use: i64 = tx.query_row("SELECT COUNT(*) FROM endpoints", [], |r| r.get(0))?;
                return Err(StoreError::SubnetExhausted {
                    subnet: subnet_key.to_string(),
                    in_use: usize::try_from(in_use).unwrap_or_default(),
                });
            };
            let row = EndpointRow {
                ip,
                status: EndpointStatus::Creating,
                ..endpoint.clone()
            };
            tx.execute(
                &format!("INSERT INTO endpoints ({ENDPOINT_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"),
                params![
                    row.owner,
                    row.app,
                    row.ip.to_string(),
                    serde_json::to_string(&row.allow_from).unwrap_or_else(|_| "[]".into()),
                    serde_json::to_string(&row.publish).unwrap_or_else(|_| "[]".into()),
                    row.status,
                    row.owner_pid,
                    row.owner_start_time,
                    row.created_at
                ],
            )?;
            tx.execute(
                "INSERT INTO ipam (subnet, last_ip) VALUES (?1, ?2)
                 ON CONFLICT(subnet) DO UPDATE SET last_ip = excluded.last_ip",
                params![subnet_key, row.ip.to_string()],
            )?;
            tx.commit()?;
            Ok(row)
        })
    }

    pub fn set_endpoint_allow_from(&self, owner: &str, allow_from: &[String]) -> StoreResult<bool> {
        self.with_conn(|conn| {
            let changed = conn.execute(
                "UPDATE endpoints SET allow_from = ?2 WHERE owner = ?1",
                params![
                    owner,
                    serde_json::to_string(allow_from).unwrap_or_else(|_| "[]".into())
                ],
            )?;
            Ok(changed > 0)
        })
    }

    /// A redeploy's switch of published ports, in one transaction: `from` publishes nothing
    /// and `to` publishes `publish` (keys as the `publish` column holds them).
    pub fn move_endpoint_publish(
        &self,
        from: &str,
        to: &str,
        publish: &[String],
    ) -> StoreResult<()> {
        self.volatile(|conn| {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            tx.execute(
                "UPDATE endpoints SET publish = '[]' WHERE owner = ?1",
                params![from],
            )?;
            tx.execute(
                "UPDATE endpoints SET publish = ?2 WHERE owner = ?1",
                params![
                    to,
                    serde_json::to_string(publish).unwrap_or_else(|_| "[]".into())
                ],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    pub fn set_endpoint_status(&self, owner: &str, status: EndpointStatus) -> StoreResult<()> {
        self.volatile(|conn| {
            conn.execute(
                "UPDATE endpoints SET status = ?2 WHERE owner = ?1",
                params![owner, status],
            )?;
            Ok(())
        })
    }

    pub fn endpoint(&self, owner: &str) -> StoreResult<Option<EndpointRow>> {
        self.read(|conn| {
            Ok(conn
                .query_row(
                    &format!("SELECT {ENDPOINT_COLUMNS} FROM endpoints WHERE owner = ?1"),
                    [owner],
                    endpoint_from_row,
                )
                .optional()?)
        })
    }

    pub fn endpoints(&self) -> StoreResult<Vec<EndpointRow>> {
        self.read(|conn| {
            let mut stmt = conn.prepare(&format!(
                "SELECT {ENDPOINT_COLUMNS} FROM endpoints ORDER BY owner"
            ))?;
            let rows = stmt.query_map([], endpoint_from_row)?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    /// Releases the endpoint's address. Idempotent: releasing twice is fine.
    pub fn remove_endpoint(&self, owner: &str) -> StoreResult<()> {
        self.with_conn(|conn| {
            conn.execute("DELETE FROM endpoints WHERE owner = ?1", [owner])?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(owner: &str) -> EndpointRow {
        EndpointRow {
            owner: owner.into(),
            app: "app".into(),
            ip: Ipv4Addr::UNSPECIFIED,
            allow_from: vec![],
            publish: vec![],
            status: EndpointStatus::Creating,
            owner_pid: None,
            owner_start_time: None,
            created_at: "2026-12-03T00:00:00Z".into(),
        }
    }

    /// A four-address subnet's order after `last`, wrapping, as the agent's is.
    fn after(last: Option<Ipv4Addr>) -> impl Iterator<Item = Ipv4Addr> {
        let start = last.map_or(0, |l| (l.octets()[3] as usize - 10 + 1) % 4);
        (0..4).map(move |i| Ipv4Addr::new(10, 0, 0, 10 + ((start + i) % 4) as u8))
    }

    #[test]
    fn addresses_go_on_after_the_last_one_skip_taken_ones_and_run_out_with_a_count() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db")).unwrap();
        let subnet = "10.0.0.8/29";
        let ip = |owner: &str| {
            store
                .insert_creating_endpoint(&row(owner), subnet, after)
                .unwrap()
                .ip
        };
        assert_eq!(ip("a"), Ipv4Addr::new(10, 0, 0, 10));
        assert_eq!(ip("b"), Ipv4Addr::new(10, 0, 0, 11));
        // A freed address is not handed out again at once: the cursor moves on.
        store.remove_endpoint("a").unwrap();
        assert_eq!(ip("c"), Ipv4Addr::new(10, 0, 0, 12));
        assert_eq!(ip("d"), Ipv4Addr::new(10, 0, 0, 13));
        // Wrapped around: .10 is free again, .11 is still taken.
        assert_eq!(ip("e"), Ipv4Addr::new(10, 0, 0, 10));
        let full = store.insert_creating_endpoint(&row("f"), subnet, after);
        assert!(
            matches!(full, Err(StoreError::SubnetExhausted { in_use: 4, .. })),
            "{full:?}"
        );
        let taken = store.insert_creating_endpoint(&row("e"), subnet, after);
        assert!(
            matches!(taken, Err(StoreError::EndpointExists { .. })),
            "{taken:?}"
        );
    }
}
