//! How the state enums of `core::status` are stored: each as the exact lowercase string it
//! always had. Reading a value this agent does not know fails loudly (the error names the
//! column and the value), never a silent default.

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSqlOutput, ValueRef};
use rusqlite::ToSql;

use crate::core::status::{
    AddonStatus, AppStatus, DiskStatus, EndpointStatus, SandboxStatus, ServerStatus, SwitchPhase,
    UnknownStatus,
};

macro_rules! stored_as_text {
    ($($name:ident),+ $(,)?) => {
        $(
            impl ToSql for $name {
                fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                    Ok(ToSqlOutput::from(self.as_str()))
                }
            }

            impl FromSql for $name {
                fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
                    value
                        .as_str()?
                        .parse()
                        .map_err(|e: UnknownStatus| FromSqlError::Other(Box::new(e)))
                }
            }
        )+
    };
}

stored_as_text!(
    DiskStatus,
    SandboxStatus,
    EndpointStatus,
    AppStatus,
    AddonStatus,
    ServerStatus,
    SwitchPhase,
);

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;
    use std::fmt;

    fn round_trips<T>(all: &[T])
    where
        T: ToSql + FromSql + PartialEq + fmt::Debug + Copy,
    {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute("CREATE TABLE t (status TEXT NOT NULL)", [])
            .unwrap();
        for value in all {
            conn.execute("DELETE FROM t", []).unwrap();
            conn.execute("INSERT INTO t (status) VALUES (?1)", [value])
                .unwrap();
            let back: T = conn
                .query_row("SELECT status FROM t", [], |r| r.get(0))
                .unwrap();
            assert_eq!(back, *value);
        }
    }

    fn unknown_is_rejected<T: FromSql + fmt::Debug>(column: &str) {
        let conn = Connection::open_in_memory().unwrap();
        let err = conn
            .query_row("SELECT 'sleeping'", [], |r| r.get::<_, T>(0))
            .unwrap_err();
        let message = err.to_string();
        assert!(message.contains("sleeping"), "{message}");
        assert!(message.contains(column), "{message}");
    }

    #[test]
    fn every_status_round_trips_through_sql() {
        round_trips(DiskStatus::ALL);
        round_trips(SandboxStatus::ALL);
        round_trips(EndpointStatus::ALL);
        round_trips(AppStatus::ALL);
        round_trips(AddonStatus::ALL);
        round_trips(ServerStatus::ALL);
    }

    #[test]
    fn an_unknown_stored_value_is_an_error_naming_the_column() {
        unknown_is_rejected::<DiskStatus>("disks.status");
        unknown_is_rejected::<SandboxStatus>("sandboxes.status");
        unknown_is_rejected::<EndpointStatus>("endpoints.status");
        unknown_is_rejected::<AppStatus>("apps.status");
        unknown_is_rejected::<AddonStatus>("addons.status");
        unknown_is_rejected::<ServerStatus>("addon_servers.status");
    }
}
