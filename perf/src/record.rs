//! The benchmark output contract: one JSON object per line on stdout,
//! `{"bench":..,"metric":..,"value":..,"unit":..,"params":{..}}`, and nothing
//! else on stdout (progress goes to stderr).

use std::io::Write;

use serde::Serialize;
use serde_json::{Map, Value};

/// One measured value.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Record {
    /// The scenario, e.g. `clone-local`.
    pub bench: String,
    pub metric: String,
    pub value: f64,
    pub unit: String,
    /// What the value depends on (sizes, counts, number of runs).
    pub params: Map<String, Value>,
}

impl Record {
    pub fn new(
        bench: &str,
        metric: impl Into<String>,
        value: f64,
        unit: &str,
        params: &Map<String, Value>,
    ) -> Self {
        Self {
            bench: bench.to_string(),
            metric: metric.into(),
            value: round(value),
            unit: unit.to_string(),
            params: params.clone(),
        }
    }

    /// The record as one line of JSON, without the newline.
    pub fn to_line(&self) -> String {
        // A struct of strings, a finite f64 and a JSON map always serializes;
        // a non-finite value is written as null by serde_json.
        serde_json::to_string(self).expect("a Record serializes")
    }
}

/// Rounds to three decimals: the machines are far noisier than that, and
/// shorter numbers keep result files readable and diffable.
fn round(value: f64) -> f64 {
    if value.is_finite() {
        (value * 1000.0).round() / 1000.0
    } else {
        value
    }
}

/// Where a scenario's records go.
pub trait Sink {
    fn emit(&mut self, record: Record) -> std::io::Result<()>;
}

/// Writes each record as a line and flushes at once, so that the results of
/// a long run survive if a later part of it fails.
#[derive(Debug)]
pub struct JsonLines<W: Write>(pub W);

impl<W: Write> Sink for JsonLines<W> {
    fn emit(&mut self, record: Record) -> std::io::Result<()> {
        writeln!(self.0, "{}", record.to_line())?;
        self.0.flush()
    }
}

impl Sink for Vec<Record> {
    fn emit(&mut self, record: Record) -> std::io::Result<()> {
        self.push(record);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_one_line_of_the_contract() {
        let mut params = Map::new();
        params.insert("clones".into(), 8.into());
        let line =
            Record::new("clone-local", "capture_pause_us", 1234.56789, "us", &params).to_line();
        assert_eq!(
            line,
            r#"{"bench":"clone-local","metric":"capture_pause_us","value":1234.568,"unit":"us","params":{"clones":8}}"#
        );
        let parsed: Value = serde_json::from_str(&line).unwrap();
        assert!(parsed["value"].is_number());
    }

    #[test]
    fn json_lines_writes_one_line_per_record() {
        let mut sink = JsonLines(Vec::new());
        let params = Map::new();
        sink.emit(Record::new("b", "m1", 1.0, "ms", &params))
            .unwrap();
        sink.emit(Record::new("b", "m2", 2.0, "ms", &params))
            .unwrap();
        let text = String::from_utf8(sink.0).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert!(text.ends_with('\n'));
    }
}
