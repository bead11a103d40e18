//! The temporary server a restore recovers is reached only through a Unix socket on its own
//! disk (the disk is mounted on the host too), with `trust` for local connections from an hba
//! file beside PGDATA and no TCP listener. So the agent logs in as the cluster's superuser
//! whatever logins and passwords existed at the point restored to (a rotation since then
//! changed them), and nothing else can reach the server at all. The cluster's own
//! `pg_hba.conf` is not touched: the restored server runs with it after the swap.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use miren_addons::Credentials;
use tokio_postgres::{Client, NoTls};

use super::logins;
use crate::core::error::Error;

/// The socket's directory and the hba file, relative to the disk's root.
const SOCKET_DIR: &str = "pitr-sock";
const HBA_FILE: &str = "pitr-hba.conf";
/// A Unix socket's path must fit `sockaddr_un` (108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Makes the socket directory and the hba file on the disk; returns the server arguments that
/// use them (and leave archiving to the restored server).
pub(super) fn prepare(mount: &Path) -> Result<Vec<String>, Error> {
    let socket = mount.join(SOCKET_DIR);
    if socket.join(".s.PGSQL.5432").as_os_str().len() > MAX_SOCKET_PATH {
        return Err(Error::internal(format!(
            "the restore's socket path under {} is too long for a Unix socket; use a shorter --data-dir",
            mount.display()
        )));
    }
    let owned = |path: &Path, mode: u32| -> Result<(), Error> {
        std::os::unix::fs::chown(path, Some(super::PG_UID), Some(super::PG_UID))
            .and_then(|()| std::fs::set_permissions(path, PermissionsExt::from_mode(mode)))
            .map_err(|e| Error::internal(format!("preparing {}: {e}", path.display())))
    };
    std::fs::create_dir_all(&socket)
        .map_err(|e| Error::internal(format!("creating {}: {e}", socket.display())))?;
    owned(&socket, 0o700)?;
    let hba = mount.join(HBA_FILE);
    std::fs::write(
        &hba,
        "# miren restore: local socket only\nlocal all all trust\n",
    )
    .map_err(|e| Error::internal(format!("writing {}: {e}", hba.display())))?;
    owned(&hba, 0o600)?;
    let inside = super::PG_DATA_MOUNT;
    Ok([
        "listen_addresses=".to_string(),
        format!("unix_socket_directories={inside}/{SOCKET_DIR}"),
        format!("hba_file={inside}/{HBA_FILE}"),
        // The new timeline's first files (history, partial segment) are not archived by this
        // short-lived server, whose shutdown would wait for them: with an empty command
        // PostgreSQL keeps them marked `.ready`, and the restored server ships them.
        "archive_command=".to_string(),
    ]
    .into_iter()
    .flat_map(|setting| ["-c".to_string(), setting])
    .collect())
}

/// The socket directory as the sandbox sees it (for tools run inside it).
pub(super) fn socket_dir_inside() -> String {
    format!("{}/{SOCKET_DIR}", super::PG_DATA_MOUNT)
}

/// Removes the socket directory and hba file (the restored disk keeps only the cluster).
pub(super) fn remove(mount: &Path) {
    let _ = std::fs::remove_dir_all(mount.join(SOCKET_DIR));
    let _ = std::fs::remove_file(mount.join(HBA_FILE));
}

/// A superuser session over the socket: the first of `candidates` that exists and is one.
pub(super) async fn connect_superuser(mount: &Path, candidates: &[&str]) -> Result<Client, String> {
    let mut last = String::from("no candidate");
    for user in candidates {
        let connected = tokio_postgres::Config::new()
            .host_path(mount.join(SOCKET_DIR))
            .port(super::PORT)
            .user(*user)
            .dbname("postgres")
            .application_name("miren-agent")
            .connect_timeout(Duration::from_secs(2))
            .connect(NoTls)
            .await;
        let (client, connection) = match connected {
            Ok(c) => c,
            Err(e) => {
                last = super::describe(&e);
                continue;
            }
        };
        tokio::spawn(async move {
            let _ = connection.await;
        });
        match client
            .query_one(
                "SELECT rolsuper FROM pg_roles WHERE rolname = current_user",
                &[],
            )
            .await
        {
            Ok(row) if row.get::<_, bool>(0) => return Ok(client),
            Ok(_) => last = format!("`{user}` is not a superuser"),
            Err(e) => last = super::describe(&e),
        }
    }
    Err(last)
}

/// Gives the recovered catalog the app's CURRENT login (the one in the agent's row): its
/// password and `LOGIN`, as a rotation login of the owner when it is one; the tenant's other
/// logins are retired, as the rotation that made the current one did.
pub(super) async fn apply_current_login(client: &Client, login: &Credentials) -> Result<(), Error> {
    let failed = |e: tokio_postgres::Error| {
        Error::busy(format!(
            "setting the app's login on the recovered server: {}",
            super::describe(&e)
        ))
    };
    let owner = logins::owner_of(client, &login.user, &login.database)
        .await
        .map_err(failed)?
        .ok_or_else(|| {
            Error::not_found(format!(
                "the recovered server has no database `{}` at that point",
                login.database
            ))
        })?;
    if owner == login.user {
        client
            .batch_execute(&format!(
                "ALTER ROLE {} LOGIN PASSWORD {}",
                super::ident(&owner),
                super::literal(&login.password)
            ))
            .await
            .map_err(failed)?;
    } else {
        logins::add_login(client, &login.database, &login.user, &login.password)
            .await
            .map_err(|e| {
                Error::busy(format!(
                    "setting the app's login on the recovered server: {e}"
                ))
            })?;
    }
    for role in [
        owner.clone(),
        logins::login_name(&owner, 1),
        logins::login_name(&owner, 2),
    ] {
        if role != login.user {
            logins::retire_login(client, &role).await.map_err(failed)?;
        }
    }
    Ok(())
}
