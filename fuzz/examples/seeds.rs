//! Writes the seed corpora of the fuzz targets, made by the real encoders
//! (descriptors captured from real VMs on KVM, datagrams, frames, records,
//! handshakes) or taken from real files (the guest images, dist/sfd.toml):
//!
//! ```text
//! cargo run --example seeds -- corpus
//! ```
//!
//! writes `corpus/<target>/<name>`. Inputs whose first byte picks a mode
//! get that byte from the same functions the targets read it with.

use std::error::Error;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use snowflock_control::descriptor::{CaptureKind, Descriptor};
use snowflock_control::protocol::{
    ApiRequest, ApiResponse, CloneOrder, FromHost, HostRequest, HostResponse, ToHost,
};
use snowflock_control::wire::{self, Direction, FrameSealer};
use snowflock_dataplane::auth::{ACCEPT, CHALLENGE_LEN, ClientHandshake, PROOF_LEN};
use snowflock_dataplane::mcast::wire::{
    self as mcast, Fragment, FragmentSealer, Header, REQUEST_FRAGMENTS, Reject, RejectCode, Repair,
};
use snowflock_dataplane::sealed::{End, record_keys};
use snowflock_dataplane::server::PAGES_CONTEXT;
use snowflock_dataplane::wire::{self as unicast, ErrorCode, PAGE_SIZE};
use snowflock_fuzz::{
    ControlInput, ControlMessage, FAMILY, GENERATION, GUEST_MEMORY, McdistInput, SESSION_KEY,
    UnicastInput, cluster_key, control_mode, mcast_key,
};
use snowflock_guest::images;
use snowflock_vmm::loader::{self, ImageKind};
use snowflock_vmm::{KvmHypervisor, Machine, MachineConfig};

type Result<T = ()> = std::result::Result<T, Box<dyn Error>>;

/// Writes seeds under one directory, a folder per target.
struct Corpus {
    root: PathBuf,
}

impl Corpus {
    fn add(&self, target: &str, name: &str, bytes: &[u8]) -> Result {
        let dir = self.root.join(target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(name), bytes)?;
        Ok(())
    }

    /// A seed of a target whose first byte picks what the rest is.
    fn add_mode(&self, target: &str, name: &str, mode: u8, bytes: &[u8]) -> Result {
        let mut seed = vec![mode];
        seed.extend_from_slice(bytes);
        self.add(target, name, &seed)
    }
}

/// Descriptors of a flock image and a Linux-ABI program, captured at boot.
fn descriptors(corpus: &Corpus) -> Result<Vec<u8>> {
    let hv = KvmHypervisor::open()?;
    let mut first = Vec::new();
    for (name, image) in [("flock", images::HELLO), ("linux", images::SYSCALLS)] {
        let config = MachineConfig {
            mem_size: GUEST_MEMORY,
            console: Arc::new(|_: &[u8]| {}),
            personality: Some(images::LINUX_PERSONALITY.into()),
            ..MachineConfig::default()
        };
        let mut machine = Machine::boot(&hv, image, &config)?;
        let (mut snapshot, memory) = machine.capture()?;
        snapshot.describe_memory(&memory)?;
        let descriptor = Descriptor {
            family: FAMILY,
            generation: 1,
            parent_vm: 1,
            kind: CaptureKind::Clone,
            captured_unix_ns: 1_700_000_000_000_000_000,
            machine: snapshot,
        };
        let encoded = descriptor.encode()?;
        corpus.add("descriptor", name, &encoded)?;
        // The target wraps an input with an odd first byte in a fitting header.
        corpus.add_mode("descriptor", &format!("{name}-payload"), 1, &encoded[24..])?;
        if first.is_empty() {
            first = encoded;
        }
    }
    Ok(first)
}

/// Every guest image, by the loader target of its kind.
fn elf_images(corpus: &Corpus) -> Result {
    for (name, bytes) in images::ALL {
        let target = match loader::kind(bytes)? {
            ImageKind::Flock => "elf_flock",
            ImageKind::Linux => "elf_linux",
        };
        corpus.add(target, name, bytes)?;
    }
    Ok(())
}

/// Datagrams of every kind under the target's keys: they decode in full.
fn mcdist(corpus: &Corpus) -> Result {
    let key = mcast_key();
    let sealer = FragmentSealer::new(key.fragment_key(FAMILY, GENERATION));
    let header = |flags| Header {
        flags,
        family: FAMILY,
        generation: GENERATION,
        sender: 3,
    };
    let page = [0xa5u8; PAGE_SIZE];
    let mut out = Vec::new();
    let raw = McdistInput::Raw as u8;
    let fragment = Fragment {
        page: 77,
        index: 1,
        count: 3,
        offset: 1368,
        data: &page[..1368],
    };
    mcast::encode_fragment(&sealer, &mut out, &header(mcast::FRAGMENT_PUSH), &fragment)?;
    corpus.add_mode("mcdist_wire", "fragment", raw, &out)?;
    let repair = Repair {
        first_page: 64,
        pages: 4,
        symbols_per_page: 1,
        symbol_len: PAGE_SIZE as u16,
        index: 0,
        count: 2,
        data: &page,
    };
    mcast::encode_repair(&sealer, &mut out, &header(0), &repair)?;
    corpus.add_mode("mcdist_wire", "repair", raw, &out)?;
    mcast::encode_request(
        &key,
        &mut out,
        &header(mcast::REQUEST_RETRY),
        5000,
        &[1, 2, 9],
    )?;
    corpus.add_mode("mcdist_wire", "request", raw, &out)?;
    let entries = [mcast::fragment_entry(5, 0b101), mcast::fragment_entry(6, 1)];
    mcast::encode_request(&key, &mut out, &header(REQUEST_FRAGMENTS), 0, &entries)?;
    corpus.add_mode("mcdist_wire", "request-fragments", raw, &out)?;
    let reject = Reject {
        page: 5,
        code: RejectCode::OutOfRange,
    };
    mcast::encode_reject(&key, &mut out, &header(0), &reject);
    corpus.add_mode("mcdist_wire", "reject", raw, &out)
}

/// Frames of every type, and the same frames sealed into records.
fn unicast_wire(corpus: &Corpus) -> Result {
    let mut frames = Vec::new();
    unicast::encode_request(FAMILY, &[1, 2, 3], &mut frames)?;
    unicast::encode_page(FAMILY, 2, &[0x5au8; PAGE_SIZE], &mut frames);
    unicast::encode_error(
        FAMILY,
        9,
        ErrorCode::OutOfRange,
        "page 9 is beyond",
        &mut frames,
    );
    corpus.add_mode(
        "unicast_wire",
        "frames",
        UnicastInput::Frames as u8,
        &frames,
    )?;
    let (mut sealer, _) = record_keys(&SESSION_KEY, End::Client);
    let mut records = Vec::new();
    sealer.seal_frames(&frames, &mut records);
    corpus.add_mode(
        "unicast_wire",
        "records",
        UnicastInput::Records as u8,
        &records,
    )
}

/// Writes `messages` as a stream, and each as a body and a sealed frame.
fn control_seeds<T: serde::Serialize>(
    corpus: &Corpus,
    name: &str,
    message: ControlMessage,
    messages: &[T],
) -> Result {
    let target = "control_frames";
    let mut stream = Vec::new();
    let mut sealer = FrameSealer::new(SESSION_KEY, Direction::FromClient);
    for (i, msg) in messages.iter().enumerate() {
        let mut frame = Vec::new();
        wire::write_frame(&mut frame, msg)?;
        stream.extend_from_slice(&frame);
        let mut body = 7u32.to_le_bytes().to_vec();
        body.extend_from_slice(&frame[4..]);
        let mode = control_mode(ControlInput::Body, message);
        corpus.add_mode(target, &format!("{name}-body-{i}"), mode, &body)?;
        // Only a direction's first frame opens: the target's opener is fresh.
        if i == 0 {
            let sealed = sealer.seal(msg)?;
            let mode = control_mode(ControlInput::Sealed, message);
            corpus.add_mode(target, &format!("{name}-sealed"), mode, &sealed[4..])?;
        }
    }
    let mode = control_mode(ControlInput::Stream, message);
    corpus.add_mode(target, &format!("{name}-stream"), mode, &stream)
}

fn control_frames(corpus: &Corpus, descriptor: Vec<u8>) -> Result {
    let requests = [
        ApiRequest::Ps,
        ApiRequest::Stats,
        ApiRequest::Wait { vm: 3 },
        ApiRequest::Clone { vm: 3, clones: 8 },
        ApiRequest::Kill {
            host: Some("h2".into()),
            vm: 7,
        },
        ApiRequest::Start {
            name: "hello".into(),
            image: images::HELLO[..256].to_vec(),
            mem_size: GUEST_MEMORY,
            cmdline: "a b".into(),
            linux: Default::default(),
            wait: true,
        },
    ];
    control_seeds(corpus, "api-request", ControlMessage::ApiRequest, &requests)?;
    let responses = [
        ApiResponse::Started { vm: 3 },
        ApiResponse::Console {
            label: "vm3".into(),
            line: "hello".into(),
        },
        ApiResponse::Error {
            message: "no such VM".into(),
        },
    ];
    control_seeds(
        corpus,
        "api-response",
        ControlMessage::ApiResponse,
        &responses,
    )?;
    let to_host = [
        ToHost::Hello { host: "h1".into() },
        ToHost::Ping,
        ToHost::Request {
            id: 1,
            request: HostRequest::Reserve {
                slots: 4,
                mem_size: GUEST_MEMORY,
            },
        },
        ToHost::Request {
            id: 2,
            request: HostRequest::Launch {
                reservation: 1,
                order: CloneOrder {
                    family: FAMILY,
                    descriptor,
                    pages: "10.0.0.1:7071".parse()?,
                    mcdist: None,
                    checkpoint: 0,
                    external: false,
                    children: vec![(1, "vm3.1".into()), (2, "vm3.2".into())],
                },
            },
        },
    ];
    control_seeds(corpus, "to-host", ControlMessage::ToHost, &to_host)?;
    let from_host = [
        FromHost::Hello { host: "h2".into() },
        FromHost::Pong,
        FromHost::Response {
            id: 1,
            response: HostResponse::Reserved {
                reservation: 1,
                granted: 4,
            },
        },
        FromHost::ChildOutput {
            family: FAMILY,
            child: 1,
            path: b"result.txt".to_vec(),
            offset: 0,
            data: b"42\n".to_vec(),
        },
    ];
    control_seeds(corpus, "from-host", ControlMessage::FromHost, &from_host)?;

    let any = ControlMessage::ApiRequest;
    let hello = ClientHandshake::new(&cluster_key(), PAGES_CONTEXT)?.hello();
    let target = "control_frames";
    corpus.add_mode(
        target,
        "hello",
        control_mode(ControlInput::Hello, any),
        &hello,
    )?;
    let mut to_server = hello.clone();
    to_server.extend_from_slice(&[0x11; PROOF_LEN]);
    let mode = control_mode(ControlInput::ToServer, any);
    corpus.add_mode(target, "to-server", mode, &to_server)?;
    let mode = control_mode(ControlInput::ProofToServer, any);
    corpus.add_mode(target, "proof-to-server", mode, &[0x11; PROOF_LEN])?;
    let mut to_client = vec![0x22; CHALLENGE_LEN];
    to_client.push(ACCEPT);
    let mode = control_mode(ControlInput::ToClient, any);
    corpus.add_mode(target, "to-client", mode, &to_client)
}

fn text(corpus: &Corpus, repo: &Path) -> Result {
    let sfd_toml = std::fs::read(repo.join("dist/sfd.toml"))?;
    corpus.add("sfd_toml", "dist-sfd.toml", &sfd_toml)?;
    corpus.add("sfd_toml", "cluster.key", cluster_key().to_hex().as_bytes())?;
    for (name, text) in [
        ("size", "512M"),
        ("size-long", " 1 GiB"),
        ("vm", "7"),
        ("host-vm", "h2/7"),
        ("cpus", "4(x2),2"),
        ("queues", "0, 2,3"),
        ("mount", "/data:/data:ro"),
    ] {
        corpus.add("cli_text", name, text.as_bytes())?;
    }
    Ok(())
}

fn main() -> Result {
    let root = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .ok_or("usage: seeds CORPUS_DIR")?;
    let corpus = Corpus { root };
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let descriptor = descriptors(&corpus)?;
    elf_images(&corpus)?;
    mcdist(&corpus)?;
    unicast_wire(&corpus)?;
    control_frames(&corpus, descriptor)?;
    text(&corpus, &repo)
}
