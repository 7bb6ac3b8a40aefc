//! What the fuzz targets and the seed generator share: the fixed keys every
//! encoder and decoder here uses, guest memory made once per process, and a
//! scripted peer that feeds fuzz bytes to code that reads a stream.
//!
//! Targets live in `fuzz_targets/`, one per parser of bytes from outside;
//! `scripts/fuzz.sh` builds and runs them all, and `examples/seeds.rs`
//! writes their seed corpora with the real encoders.

use std::io::{Read, Write};

use snowflock_dataplane::auth::ClusterKey;
use snowflock_dataplane::mcast::wire::McastKey;
use snowflock_vmm::memory::{GuestMemory, HostPages};

/// The cluster key of every target and seed, so that seeds sealed or
/// tagged by the seed generator open in the targets.
pub const CLUSTER_KEY: [u8; 32] = [0x5a; 32];
/// The session key of sealed unicast records and control frames.
pub const SESSION_KEY: [u8; 32] = [0xc3; 32];
/// The family and generation whose FRAGMENT key the mcdist target holds.
pub const FAMILY: u64 = 0x1122_3344_5566_7788;
pub const GENERATION: u32 = 9;
/// Guest memory of the loader targets: the smallest a VM may have.
pub const GUEST_MEMORY: u64 = snowflock_abi::MIN_MEM_SIZE;

pub fn cluster_key() -> ClusterKey {
    ClusterKey::from_bytes(CLUSTER_KEY)
}

pub fn mcast_key() -> McastKey {
    McastKey::new(cluster_key())
}

/// Fresh guest memory of [`GUEST_MEMORY`] bytes; targets make one per
/// process (making it costs far more than a load).
pub fn guest_memory() -> GuestMemory {
    GuestMemory::new(GUEST_MEMORY, HostPages::Base).expect("guest memory for the fuzz target")
}

/// A peer whose messages are fuzz bytes: reads take from them (then end of
/// stream), writes are accepted and dropped.
#[derive(Debug)]
pub struct ScriptedPeer<'a> {
    messages: &'a [u8],
}

impl<'a> ScriptedPeer<'a> {
    pub fn new(messages: &'a [u8]) -> Self {
        Self { messages }
    }
}

impl Read for ScriptedPeer<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.messages.read(buf)
    }
}

impl Write for ScriptedPeer<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// What the first byte of a `mcdist_wire` input says the rest is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum McdistInput {
    /// A datagram off the network.
    Raw = 0,
    /// Fields the target encodes into a datagram and then mutates.
    Built = 1,
}

impl McdistInput {
    pub fn of(mode: u8) -> Self {
        if mode & 1 == 0 {
            Self::Raw
        } else {
            Self::Built
        }
    }
}

/// What the first byte of a `unicast_wire` input says the rest is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnicastInput {
    /// A peer's frames.
    Frames = 0,
    /// A peer's sealed records.
    Records = 1,
    /// A record the target seals and flips a bit of.
    Flipped = 2,
}

impl UnicastInput {
    pub fn of(mode: u8) -> Self {
        match mode % 3 {
            0 => Self::Frames,
            1 => Self::Records,
            _ => Self::Flipped,
        }
    }
}

/// What a `control_frames` input holds after its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlInput {
    /// A stream of length-prefixed frames, read as the local API reads them.
    Stream,
    /// A bit to flip (4 bytes, little-endian), then a frame body: decoded,
    /// re-encoded, sealed and opened again, and sealed with the bit flipped.
    Body,
    /// A peer's authenticated frame, without its length prefix.
    Sealed,
    /// A HELLO, as the server reads it.
    Hello,
    /// A client's messages to the server's handshake.
    ToServer,
    /// The client's proof, after a real HELLO, to the server's handshake.
    ProofToServer,
    /// A server's messages to the client's handshake.
    ToClient,
}

/// The message type a `control_frames` input's frames carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlMessage {
    ApiRequest,
    ApiResponse,
    ToHost,
    FromHost,
}

const CONTROL_INPUTS: [ControlInput; 7] = [
    ControlInput::Stream,
    ControlInput::Body,
    ControlInput::Sealed,
    ControlInput::Hello,
    ControlInput::ToServer,
    ControlInput::ProofToServer,
    ControlInput::ToClient,
];
const CONTROL_MESSAGES: [ControlMessage; 4] = [
    ControlMessage::ApiRequest,
    ControlMessage::ApiResponse,
    ControlMessage::ToHost,
    ControlMessage::FromHost,
];

/// The first byte of a `control_frames` input of `input` carrying `message`.
pub fn control_mode(input: ControlInput, message: ControlMessage) -> u8 {
    (input as u8) * CONTROL_MESSAGES.len() as u8 + message as u8
}

/// What a `control_frames` input's first byte says.
pub fn control_input(mode: u8) -> (ControlInput, ControlMessage) {
    let count = CONTROL_MESSAGES.len();
    let mode = usize::from(mode) % (CONTROL_INPUTS.len() * count);
    (CONTROL_INPUTS[mode / count], CONTROL_MESSAGES[mode % count])
}
