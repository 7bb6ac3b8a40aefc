//! What of `sf` other crates can reach: the hand-written parsers of its
//! arguments and environment ([`text`]), kept apart from the binaries so
//! that they are tested and fuzzed as the CLI runs them.
//!
//! ```
//! use snowflock_tools::text::{cpus_per_node, parse_vm_ref};
//!
//! assert_eq!(parse_vm_ref("h2/7").unwrap(), (Some("h2".to_string()), 7));
//! assert_eq!(cpus_per_node("4(x2),2").unwrap(), [4, 4, 2]);
//! ```

pub mod text;
