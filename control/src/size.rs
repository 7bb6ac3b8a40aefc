//! Sizes in configuration and on the command line: `512M`, `1G`, `1GiB`, `4096` (bytes).

/// A text that is not a size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("{text:?} is not a size (examples: 512M, 1G)")]
    NotANumber { text: String },
    #[error("unknown size unit {unit:?} in {text:?}")]
    UnknownUnit { unit: String, text: String },
    #[error("{text:?} is too large")]
    TooLarge { text: String },
}

/// Parses a size with an optional K/M/G/T suffix (binary units).
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let t = text.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(digits_end);
    let value: u64 = digits.parse().map_err(|_| SizeError::NotANumber {
        text: text.to_string(),
    })?;
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => {
            return Err(SizeError::UnknownUnit {
                unit: other.to_string(),
                text: text.to_string(),
            });
        }
    };
    value
        .checked_mul(1 << shift)
        .ok_or_else(|| SizeError::TooLarge {
            text: text.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn parses_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size(" 256 mb "), Ok(256 << 20));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn errors_name_the_text() {
        assert_eq!(
            parse_size("1X").unwrap_err().to_string(),
            r#"unknown size unit "x" in "1X""#
        );
        assert_eq!(
            parse_size("G").unwrap_err().to_string(),
            r#""G" is not a size (examples: 512M, 1G)"#
        );
        assert_eq!(
            parse_size("99999999999T").unwrap_err().to_string(),
            r#""99999999999T" is too large"#
        );
    }
}
