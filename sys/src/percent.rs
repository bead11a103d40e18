//! Percent-encoding for URL path segments, query values and userinfo.

/// Encodes every byte but RFC 3986's unreserved characters (`A-Z a-z 0-9 - . _ ~`), byte by
/// byte, so UTF-8 comes out as its encoded bytes (owners like `pid:12`, image references like
/// `ghcr.io/org/app:1`, passwords in a connection URL).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
    }
    out
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_unreserved_and_encodes_the_rest() {
        assert_eq!(percent_encode("AZaz09-._~"), "AZaz09-._~");
        assert_eq!(percent_encode("pid:12"), "pid%3A12");
        assert_eq!(
            percent_encode("ghcr.io/org/app:1"),
            "ghcr.io%2Forg%2Fapp%3A1"
        );
        assert_eq!(percent_encode("a b%/?#@"), "a%20b%25%2F%3F%23%40");
        assert_eq!(percent_encode("é"), "%C3%A9");
        assert_eq!(percent_encode("\n\u{7f}"), "%0A%7F");
        assert_eq!(percent_encode(""), "");
    }

    #[test]
    fn every_byte_matches_the_format_rule() {
        // The two encoders this one replaced used `format!("%{b:02X}")`.
        for b in 0u8..=127 {
            let s = char::from(b).to_string();
            let want = if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                s.clone()
            } else {
                format!("%{b:02X}")
            };
            assert_eq!(percent_encode(&s), want);
        }
    }
}
