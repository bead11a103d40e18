//! Untrusted text (a name from a client, a snapshot file's header) made safe to print on a
//! terminal or in a log.

/// Control characters (C0, DEL, C1: terminal escapes, carriage returns, newlines), the
/// invisible bidirectional and zero-width formatting characters, and `\` are shown escaped
/// (`\u{..}`, `\\`); everything else as it is.
pub fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        let invisible = matches!(c,
            '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}');
        if c.is_control() || invisible || c == '\\' {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn escapes_what_a_terminal_would_act_on() {
        assert_eq!(printable("ok-name"), "ok-name");
        assert_eq!(printable("a\u{1b}[2Jb\r\n"), "a\\u{1b}[2Jb\\r\\n");
        assert_eq!(printable("x\u{202E}y\\"), "x\\u{202e}y\\\\");
    }
}
