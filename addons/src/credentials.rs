//! Credentials for an app's PostgreSQL role.

use std::fmt;

use crate::ident::PgIdentifiers;

/// 32 characters from 62 symbols: about 190 bits, well over the 128 we promise.
pub const PASSWORD_LEN: usize = 32;

const ALPHABET: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

#[derive(Debug, thiserror::Error)]
#[error("reading random bytes from the operating system: {0}")]
pub struct RandomError(getrandom::Error);

// By hand: thiserror's `#[from]` also makes it the `source`, which needs getrandom's `std`.
impl From<getrandom::Error> for RandomError {
    fn from(e: getrandom::Error) -> Self {
        RandomError(e)
    }
}

/// Random password from the OS generator. Alphanumeric only, so it needs no quoting in a
/// URL, a shell, a `.pgpass` line or SQL string literal.
pub fn generate_password() -> Result<String, RandomError> {
    let mut out = String::with_capacity(PASSWORD_LEN);
    let mut buf = [0u8; 64];
    while out.len() < PASSWORD_LEN {
        getrandom::fill(&mut buf)?;
        // Rejection sampling: 248 = 4 * 62, so every kept byte maps uniformly.
        for b in buf {
            if b < 248 && out.len() < PASSWORD_LEN {
                out.push(char::from(ALPHABET[usize::from(b % 62)]));
            }
        }
    }
    Ok(out)
}

/// An app's login on a PostgreSQL server.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub password: String,
    pub database: String,
}

impl Credentials {
    /// Role and database derived from the app name, with a fresh password.
    pub fn generate(app_name: &str) -> Result<Credentials, RandomError> {
        let ids = PgIdentifiers::for_app(app_name);
        Ok(Credentials {
            user: ids.role,
            password: generate_password()?,
            database: ids.database,
        })
    }
}

/// Never prints the password, so credentials can sit in structs that get logged.
impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &crate::env::MASK)
            .field("database", &self.database)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn passwords_are_long_alphanumeric_and_distinct() {
        let mut seen = HashSet::new();
        for _ in 0..200 {
            let p = generate_password().unwrap();
            assert_eq!(p.len(), PASSWORD_LEN);
            assert!(p.chars().all(|c| c.is_ascii_alphanumeric()), "{p}");
            assert!(seen.insert(p));
        }
        // At least 128 bits of entropy.
        assert!(PASSWORD_LEN as f64 * 62f64.log2() >= 128.0);
    }

    #[test]
    fn every_symbol_turns_up() {
        // 200 * 32 draws from 62 symbols: missing one is vanishingly unlikely unless biased.
        let all: HashSet<char> = (0..200)
            .flat_map(|_| generate_password().unwrap().chars().collect::<Vec<_>>())
            .collect();
        assert_eq!(all.len(), 62);
    }

    #[test]
    fn generated_credentials_use_derived_names_and_hide_the_password() {
        let c = Credentials::generate("my-app").unwrap();
        assert_eq!(c.user, PgIdentifiers::for_app("my-app").role);
        assert_eq!(c.database, c.user);
        let debug = format!("{c:?}");
        assert!(!debug.contains(&c.password), "{debug}");
    }
}
