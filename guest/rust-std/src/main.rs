//! clonestd: a Linux-ABI example in Rust with `std` (static, run with `sf
//! run`). It counts words in a text file (a host mount, or generated text
//! if no file is given) with a `HashMap`, split over clones: each clone
//! counts its share of the lines, writes them to `/out/counts-<id>.txt`, and
//! hands its counts back; the parent merges them and checks them against its
//! own count. Usage: `clonestd [FILE] [clones]` (default: generated text, 2).

use std::collections::HashMap;
use std::fmt::Write as _;

use snowflock_guest::{Fork, clone, exit, join, request_ticket};

fn count(lines: &[&str]) -> HashMap<String, u64> {
    let mut counts = HashMap::new();
    for word in lines.iter().flat_map(|l| l.split_whitespace()) {
        *counts.entry(word.to_lowercase()).or_insert(0) += 1;
    }
    counts
}

/// `word count` lines, sorted by word.
fn encode(counts: &HashMap<String, u64>) -> String {
    let mut words: Vec<_> = counts.iter().collect();
    words.sort();
    let mut text = String::new();
    for (word, n) in words {
        let _ = writeln!(text, "{word} {n}");
    }
    text
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let text = match args.get(1).filter(|a| a.as_str() != "-") {
        Some(path) => std::fs::read_to_string(path).expect("reading the input"),
        None => (0..20_000)
            .map(|i| {
                format!(
                    "the quick brown fox {} jumps over the lazy dog {}\n",
                    i % 97,
                    i % 13
                )
            })
            .collect(),
    };
    let clones: u32 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(2);
    let lines: Vec<&str> = text.lines().collect();
    println!("clonestd: {} lines", lines.len());

    let ticket = request_ticket(clones).expect("a ticket");
    let granted = ticket.granted() as usize;
    let per = lines.len().div_ceil(granted.max(1));
    if let Fork::Child(id) = clone(&ticket).expect("clone") {
        let from = (id as usize - 1) * per;
        let share = &lines[from.min(lines.len())..(from + per).min(lines.len())];
        let counts = encode(&count(share));
        std::fs::create_dir_all("/out").expect("/out");
        std::fs::write(format!("/out/counts-{id}.txt"), &counts).expect("writing /out");
        exit(counts.as_bytes());
    }
    let mut merged: HashMap<String, u64> = HashMap::new();
    for child in join(&ticket).expect("join") {
        let bytes = child.result.expect("every clone hands back its counts");
        for line in String::from_utf8(bytes).expect("UTF-8").lines() {
            let (word, n) = line.rsplit_once(' ').expect("word count");
            *merged.entry(word.to_string()).or_insert(0) += n.parse::<u64>().expect("a count");
        }
    }
    let serial = count(&lines);
    let ok = merged == serial;
    println!(
        "clonestd: clones={granted} words={} distinct={} match={ok}",
        serial.values().sum::<u64>(),
        serial.len()
    );
    std::process::exit(if ok { 0 } else { 1 });
}
