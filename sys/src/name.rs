//! The one name rule for apps, services, sandboxes and disks, and the one way to fit a longer
//! name into it with a hash. Each crate keeps its own error wording; the rule lives here.

/// Longest name (a DNS label, so a name can become a hostname or a path component).
pub const MAX_NAME_LEN: usize = 63;

/// `-` and 8 hex digits.
const HASH_SUFFIX_LEN: usize = 9;

/// The first way a name breaks the rule, in the order the rule is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameViolation {
    Empty,
    /// Its length in characters.
    TooLong(usize),
    /// The first character that is not a letter, digit or hyphen.
    BadChar(char),
    /// It starts with a hyphen.
    BadStart,
}

impl std::fmt::Display for NameViolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NameViolation::Empty => write!(f, "is empty"),
            NameViolation::TooLong(len) => {
                write!(f, "is {len} characters long, more than {MAX_NAME_LEN}")
            }
            NameViolation::BadChar(c) => {
                write!(f, "has {c:?}: use letters, digits and hyphens only")
            }
            NameViolation::BadStart => write!(f, "starts with a hyphen"),
        }
    }
}

impl std::error::Error for NameViolation {}

/// A name that keeps the rule ([`check_name`]): made only through [`Name::new`], which checks
/// it, or [`Name::shortened`], so whoever holds one need not check it again.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(String);

impl Name {
    pub fn new(name: impl Into<String>) -> Result<Name, NameViolation> {
        let name = name.into();
        check_name(&name)?;
        Ok(Name(name))
    }

    /// `name` itself when it fits, else cut with `-<hash>` ([`shortened`]); `name` may be
    /// longer than the rule allows, its characters must keep it.
    pub fn shortened(name: &str, hash: u32) -> Result<Name, NameViolation> {
        Name::new(shortened(name, hash))
    }

    /// `name` cut and always given `-<hash>` ([`with_hash_suffix`]).
    pub fn with_hash_suffix(name: &str, hash: u32) -> Result<Name, NameViolation> {
        Name::new(with_hash_suffix(name, hash))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl std::ops::Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl From<Name> for String {
    fn from(name: Name) -> String {
        name.0
    }
}

impl std::str::FromStr for Name {
    type Err = NameViolation;
    fn from_str(s: &str) -> Result<Name, NameViolation> {
        Name::new(s)
    }
}

/// Letters, digits and hyphens, 1-63 characters, starting with a letter or digit.
pub fn check_name(name: &str) -> Result<(), NameViolation> {
    let len = name.chars().count();
    if len == 0 {
        return Err(NameViolation::Empty);
    }
    if len > MAX_NAME_LEN {
        return Err(NameViolation::TooLong(len));
    }
    if let Some(ch) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
    {
        return Err(NameViolation::BadChar(ch));
    }
    if name.starts_with('-') {
        return Err(NameViolation::BadStart);
    }
    Ok(())
}

/// `name` cut to leave room for `-<hash>` (hyphens at the cut dropped), then `-<hash>` as 8 hex
/// digits: always within [`MAX_NAME_LEN`], and distinct names stay distinct through `hash`.
pub fn with_hash_suffix(name: &str, hash: u32) -> String {
    let keep: String = name.chars().take(MAX_NAME_LEN - HASH_SUFFIX_LEN).collect();
    format!("{}-{hash:08x}", keep.trim_end_matches('-'))
}

/// `name` itself when it fits [`MAX_NAME_LEN`] bytes, else [`with_hash_suffix`].
pub fn shortened(name: &str, hash: u32) -> String {
    if name.len() <= MAX_NAME_LEN {
        name.to_string()
    } else {
        with_hash_suffix(name, hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_checked_once_and_kept() {
        let name = Name::new("app-data1").unwrap();
        assert_eq!(name, "app-data1");
        assert_eq!(name.len(), 9); // a str through Deref
        assert_eq!(Name::new("a_b"), Err(NameViolation::BadChar('_')));
        assert_eq!("-a".parse::<Name>(), Err(NameViolation::BadStart));
        let long = format!("{}-{}", "a".repeat(53), "b".repeat(20));
        let short = Name::shortened(&long, 0xdead_beef).unwrap();
        assert_eq!(short.as_str(), shortened(&long, 0xdead_beef));
        assert!(Name::shortened("a b", 1).is_err());
        assert_eq!(Name::with_hash_suffix("web", 1).unwrap(), "web-00000001");
        assert!(NameViolation::TooLong(70).to_string().contains("63"));
    }

    #[test]
    fn the_rule() {
        assert_eq!(check_name("app-data1"), Ok(()));
        assert_eq!(check_name(&"a".repeat(63)), Ok(()));
        assert_eq!(check_name(""), Err(NameViolation::Empty));
        assert_eq!(check_name(&"a".repeat(64)), Err(NameViolation::TooLong(64)));
        assert_eq!(check_name("a_b"), Err(NameViolation::BadChar('_')));
        assert_eq!(check_name("-a"), Err(NameViolation::BadStart));
        assert_eq!(check_name("-a b"), Err(NameViolation::BadChar(' ')));
        assert_eq!(check_name("é"), Err(NameViolation::BadChar('é')));
    }

    #[test]
    fn shortening_fits_and_keeps_short_names() {
        assert_eq!(shortened("web", 1), "web");
        let long = format!("{}-{}", "a".repeat(53), "b".repeat(20));
        let short = shortened(&long, 0xdead_beef);
        assert_eq!(short, format!("{}-deadbeef", "a".repeat(53)));
        assert!(short.len() <= MAX_NAME_LEN);
        assert_eq!(with_hash_suffix("data", 0x0a), "data-0000000a");
        assert_eq!(check_name(&with_hash_suffix(&"x".repeat(99), 7)), Ok(()));
    }
}
