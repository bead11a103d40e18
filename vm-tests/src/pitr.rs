//! Helpers of the point-in-time restore tests (`addon_pitr`, `addon_pitr_shared`).

use serde_json::Value;

use crate::addons::psql_ok;
use crate::TestAgent;

const PG: &str = "miren-postgresql";

/// Removes the target directory when the test ends, also when it fails.
pub struct RemoveDir(pub String);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `miren addon backups miren-postgresql -a APP --json`.
pub fn backups(agent: &TestAgent, app: &str) -> Value {
    agent.json(&["addon", "backups", PG, "-a", app, "--json"])
}

/// Now, by the server's clock, in UTC RFC 3339 with microseconds.
pub fn server_now(url: &str) -> String {
    psql_ok(
        url,
        r#"SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"#,
    )
}

/// `miren addon restore miren-postgresql -a APP --yes --json HOW...`.
pub fn restore(agent: &TestAgent, app: &str, how: &[&str]) -> Value {
    let mut args = vec!["addon", "restore", PG, "-a", app, "--yes", "--json"];
    args.extend_from_slice(how);
    agent.json(&args)
}

/// The rows of `table`.
pub fn count(url: &str, table: &str) -> i64 {
    psql_ok(url, &format!("SELECT count(*) FROM {table}"))
        .parse()
        .expect("a count")
}
