//! The SCRAM iteration count of the passwords the agent sets. Every password it makes is 32
//! random characters of `[A-Za-z0-9]` (about 190 bits): PBKDF2's 4096 rounds (PostgreSQL's
//! default) stretch guessable passwords and add nothing against these, but every client pays
//! them on every login (about 3 ms of CPU here). With connections opened per request that
//! floor hid most of what the pooler saves, so the agent's sessions set a low count (PostgreSQL
//! 16+; older servers keep theirs) before they set a password.

use tokio_postgres::Client;

use super::{describe, ident, literal};

/// Rounds for the agent's generated passwords (see the module's comment).
pub const SCRAM_ITERATIONS: u32 = 16;

/// Makes passwords this session sets use [`SCRAM_ITERATIONS`] (a no-op before PostgreSQL 16,
/// which has no such setting).
pub(super) async fn for_session(client: &Client) -> Result<(), String> {
    client
        .batch_execute(&format!(
            "DO $$ BEGIN
               IF current_setting('server_version_num')::int >= 160000 THEN
                 PERFORM set_config('scram_iterations', '{SCRAM_ITERATIONS}', false);
               END IF;
             END $$"
        ))
        .await
        .map_err(|e| format!("setting scram_iterations: {}", describe(&e)))
}

/// Sets `user`'s password again (the same one) in this session, so its stored secret uses
/// this session's iteration count: the image's initdb made it with the default. Safe to repeat.
pub(super) async fn rehash(client: &Client, user: &str, password: &str) -> Result<(), String> {
    client
        .batch_execute(&format!(
            "ALTER ROLE {} PASSWORD {}",
            ident(user),
            literal(password)
        ))
        .await
        .map_err(|e| format!("setting `{user}`'s password: {}", describe(&e)))
}
