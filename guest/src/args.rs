//! The image's argument string: space-separated `key=value` pairs, e.g.
//! `clones=8 seed=3`. A key given twice takes its last value; a bare word
//! is a key with an empty value.

use crate::boot_info;

/// The whole argument string.
pub fn cmdline() -> &'static str {
    let info = boot_info();
    // SAFETY: the runtime checked at entry that the string lies inside the boot
    // page, which stays mapped and unchanged.
    let bytes = unsafe {
        core::slice::from_raw_parts(info.cmdline_ptr as *const u8, info.cmdline_len as usize)
    };
    core::str::from_utf8(bytes).expect("argument string is not UTF-8")
}

/// Every `(key, value)` pair, in order.
pub fn args() -> impl Iterator<Item = (&'static str, &'static str)> {
    pairs(cmdline())
}

/// The value of `key`, if given.
pub fn arg(key: &str) -> Option<&'static str> {
    find(cmdline(), key)
}

/// The value of `key`, or `default`.
pub fn arg_str(key: &str, default: &'static str) -> &'static str {
    arg(key).unwrap_or(default)
}

/// `key` as an unsigned integer (decimal or `0x` hex, `_` separators allowed),
/// or `default` when absent.
///
/// # Panics
/// If the value is present but not a number: a typo should stop the guest,
/// not silently run with the default.
pub fn arg_u64(key: &str, default: u64) -> u64 {
    match arg(key) {
        None => default,
        Some(v) => parse_u64(v)
            .unwrap_or_else(|| panic!("argument {key}={v}: expected an unsigned integer")),
    }
}

/// [`arg_u64`] for values that must fit in a `u32`.
pub fn arg_u32(key: &str, default: u32) -> u32 {
    let v = arg_u64(key, u64::from(default));
    u32::try_from(v).unwrap_or_else(|_| panic!("argument {key}={v}: too large"))
}

/// Splits an argument string into `(key, value)` pairs.
pub fn pairs(cmdline: &str) -> impl Iterator<Item = (&str, &str)> {
    cmdline
        .split_ascii_whitespace()
        .map(|word| word.split_once('=').unwrap_or((word, "")))
}

/// The last value of `key` in `cmdline`.
pub fn find<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    pairs(cmdline)
        .filter(|(k, _)| *k == key)
        .map(|(_, v)| v)
        .last()
}

/// Parses `123`, `1_000_000` or `0x1f`.
pub fn parse_u64(s: &str) -> Option<u64> {
    let (digits, radix) = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => (hex, 16),
        None => (s, 10),
    };
    let mut value: u64 = 0;
    let mut any = false;
    for c in digits.chars() {
        if c == '_' {
            continue;
        }
        let d = c.to_digit(radix)?;
        value = value
            .checked_mul(u64::from(radix))?
            .checked_add(u64::from(d))?;
        any = true;
    }
    any.then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_last_value() {
        let c = "clones=8  seed=3 verbose clones=4";
        assert_eq!(find(c, "clones"), Some("4"));
        assert_eq!(find(c, "seed"), Some("3"));
        assert_eq!(find(c, "verbose"), Some(""));
        assert_eq!(find(c, "missing"), None);
        assert_eq!(find("", "x"), None);
        assert_eq!(find("kind=a=b", "kind"), Some("a=b"));
    }

    #[test]
    fn parses_numbers() {
        assert_eq!(parse_u64("0"), Some(0));
        assert_eq!(parse_u64("4_000_000"), Some(4_000_000));
        assert_eq!(parse_u64("0x1F"), Some(31));
        assert_eq!(parse_u64("18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_u64("18446744073709551616"), None);
        assert_eq!(parse_u64(""), None);
        assert_eq!(parse_u64("_"), None);
        assert_eq!(parse_u64("0x"), None);
        assert_eq!(parse_u64("-1"), None);
        assert_eq!(parse_u64("12a"), None);
    }
}
