//! Library side of the `sf` tools: a local multi-host test cluster ([`cluster`]).

pub mod cluster;
