//! Cluster prefixes: every namespace and link of a cluster is named `{prefix}-...`, so the
//! prefix is what keeps two clusters apart. A prefix is 1 to [`MAX_PREFIX_LEN`] characters
//! from `[a-z0-9]`; a fresh one is `sf` + 6 random hex digits.

use crate::error::{InvalidSpec, RandomSourceError};

/// Longest prefix: `{prefix}-h32` must fit a 15-byte interface name.
pub const MAX_PREFIX_LEN: usize = 8;

/// A fresh prefix: `sf` + 6 random hex digits.
pub fn random_prefix() -> Result<String, RandomSourceError> {
    let mut bytes = [0u8; 3];
    getrandom::fill(&mut bytes).map_err(|e| RandomSourceError {
        problem: e.to_string(),
    })?;
    Ok(format!(
        "sf{:02x}{:02x}{:02x}",
        bytes[0], bytes[1], bytes[2]
    ))
}

/// Checks a prefix: 1 to [`MAX_PREFIX_LEN`] characters from `[a-z0-9]`.
pub fn validate_prefix(prefix: &str) -> Result<(), InvalidSpec> {
    let ok = !prefix.is_empty()
        && prefix.len() <= MAX_PREFIX_LEN
        && prefix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(InvalidSpec {
            problem: format!(
                "prefix {prefix:?} must be 1 to {MAX_PREFIX_LEN} characters from [a-z0-9]"
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::MAX_HOSTS;

    #[test]
    fn prefixes_are_short_lowercase_alphanumerics() {
        let drawn = random_prefix().unwrap();
        assert_eq!(drawn.len(), 8);
        validate_prefix(&drawn).unwrap();
        for good in ["a", "sf01", "abcdefgh"] {
            validate_prefix(good).unwrap();
        }
        for bad in ["", "abcdefghi", "Sf01", "sf-1", "sf_1", "sf 1"] {
            assert!(validate_prefix(bad).is_err(), "{bad:?} accepted");
        }
        // The longest derived interface name fits IFNAMSIZ - 1.
        assert!(format!("{}-h{MAX_HOSTS}", "x".repeat(MAX_PREFIX_LEN)).len() <= 15);
    }
}
