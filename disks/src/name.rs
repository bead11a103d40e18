use miren_sys::name::NameViolation;

/// Longest disk name accepted (a DNS label, so names can become hostnames and paths safely).
pub const MAX_NAME_LEN: usize = miren_sys::name::MAX_NAME_LEN;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("a disk name must not be empty; use letters, digits and hyphens, e.g. `app-data`")]
    Empty,
    #[error("disk name `{0}` is {1} characters long; the limit is 63")]
    TooLong(String, usize),
    #[error("disk name `{0}` must start with a letter or digit")]
    BadStart(String),
    #[error("disk name `{name}` contains `{ch}`; only letters, digits and hyphens are allowed")]
    BadChar { name: String, ch: String },
}

/// Names are alphanumeric and hyphens, 1-63 characters, starting with a letter or digit.
/// Checked before anything is made, so a bad name never reaches the filesystem.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    miren_sys::name::check_name(name).map_err(|violation| match violation {
        NameViolation::Empty => NameError::Empty,
        NameViolation::TooLong(len) => NameError::TooLong(printable(name), len),
        NameViolation::BadChar(ch) => NameError::BadChar {
            name: printable(name),
            ch: printable(&ch.to_string()),
        },
        NameViolation::BadStart => NameError::BadStart(printable(name)),
    })
}

/// A refused name is echoed in the error; it may come from a snapshot file or a client and
/// hold terminal escapes, so control and invisible formatting characters are shown escaped.
fn printable(s: &str) -> String {
    miren_sys::printable(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_names() {
        for ok in [
            "a",
            "A1",
            "app-data",
            "0day",
            &"x".repeat(63),
            "pg-shared-data-1",
        ] {
            assert_eq!(validate_name(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn refuses_everything_else() {
        let long = "x".repeat(64);
        for bad in [
            "", "../x", "a_b", "a.b", "a b", " a", "-a", "a/b", "é", "a\n", &long,
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn errors_name_the_problem() {
        let err = validate_name("a_b").unwrap_err().to_string();
        assert!(
            err.contains('_') && err.contains("letters, digits and hyphens"),
            "{err}"
        );
        let err = validate_name("a\u{1b}[2Jb").unwrap_err().to_string();
        assert!(!err.contains('\u{1b}') && err.contains("\\u{1b}"), "{err}");
        let err = validate_name(&"y".repeat(64)).unwrap_err().to_string();
        assert!(err.contains("64") && err.contains("63"), "{err}");
    }
}
