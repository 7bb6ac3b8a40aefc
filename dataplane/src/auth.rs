//! Cluster-key authentication shared by the page protocol and the control protocol.
//!
//! Every host of a cluster holds the same 32-byte [`ClusterKey`]. Before anything else happens
//! on a connection, both ends prove that they hold it with a mutual HMAC-SHA256
//! challenge-response. Nothing secret crosses the wire: only random nonces and proofs.
//!
//! # Handshake
//!
//! ```text
//! client → server  HELLO      magic "SFAUTH2\0" (8) | context_len u8 | context | key_id (4)
//!                             | client_nonce (32)
//! server → client  CHALLENGE  server_nonce (32) | server_proof (32)
//! client → server  PROOF      client_proof (32)
//! server → client  ACCEPT     0x01
//! ```
//!
//! with
//!
//! ```text
//! proof(role)  = HMAC-SHA256(key, "snowflock-auth-v1" | role | context_len u64 LE | context
//!                                 | client_nonce | server_nonce)
//! session_key  = HMAC-SHA256(key, "snowflock-session-v1" | context_len u64 LE | context
//!                                 | client_nonce | server_nonce)
//! ```
//!
//! where `role` is one byte, `b'C'` for the client's proof and `b'S'` for the server's, and `key`
//! is the cluster key whose [`KeyId`] the HELLO names. A host holds one key, or two while a
//! rotation is under way ([`crate::keyring::KeyRing`]): the client proves with the key it sends
//! with now, and the server answers with that key if it accepts it, so two hosts that hold a key
//! in common agree on it in the same three messages.
//!
//! - The client checks the server's proof *before* it sends its own, so a server without the
//!   key learns nothing that it could replay elsewhere.
//! - The server checks the client's proof before it accepts, and before it reads anything else.
//!   On any failure (bad magic, wrong context, bad proof, timeout) the server closes the
//!   connection without sending another byte; the client then sees [`AuthError::Rejected`].
//! - The context (`b"pages"`, `b"control"`) is both announced in the HELLO (the server refuses
//!   a context it does not serve) and bound into every proof, so a proof made for one protocol
//!   is useless on the other.
//! - A HELLO naming a key the server does not hold is refused like a bad proof
//!   ([`AuthError::UnknownKey`] on the server). The id is the key's public fingerprint.
//! - Each side contributes a fresh nonce, so a recorded exchange cannot be replayed to either
//!   side. The role byte stops a peer from reflecting a proof back at its maker.
//!
//! The handshake authenticates the two ends of a connection; it does not encrypt or protect the
//! frames that follow. A caller that needs per-frame integrity MACs its frames with
//! [`session_key`] (the value returned by both handshake helpers).
//!
//! # Using it
//!
//! Blocking callers use [`client_handshake`] and [`server_handshake`]. Async callers drive the
//! same exchange themselves with the sans-I/O pieces: [`ClientHandshake`] (HELLO, then the
//! response to the challenge, then the ACCEPT byte) and, on the server,
//! [`hello_remaining_len`] + [`Hello::parse`] + [`ServerHandshake`].

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use hmac::digest::{Key, KeyInit};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// Length of a cluster key in bytes.
pub const KEY_LEN: usize = 32;
/// Length of a handshake nonce in bytes.
pub const NONCE_LEN: usize = 32;
/// Length of a proof (an HMAC-SHA256 tag) in bytes.
pub const PROOF_LEN: usize = 32;
/// Length of a session key in bytes.
pub const SESSION_KEY_LEN: usize = 32;
/// First bytes of every HELLO.
pub const MAGIC: [u8; 8] = *b"SFAUTH2\0";
/// Length of a [`KeyId`] in bytes.
pub const KEY_ID_LEN: usize = 4;
/// Longest protocol context a HELLO may carry.
pub const MAX_CONTEXT_LEN: usize = 64;
/// The fixed part of a HELLO that says how long the rest is: magic + context length.
pub const HELLO_HEADER_LEN: usize = MAGIC.len() + 1;
/// The server's CHALLENGE: server nonce + server proof.
pub const CHALLENGE_LEN: usize = NONCE_LEN + PROOF_LEN;
/// The byte a server sends once it has verified the client's proof.
pub const ACCEPT: u8 = 0x01;

const PROOF_LABEL: &[u8] = b"snowflock-auth-v1";
const SESSION_LABEL: &[u8] = b"snowflock-session-v1";
/// Longest text a key file may hold: 64 hex digits and a line ending.
const MAX_KEY_FILE_LEN: u64 = 2 * KEY_LEN as u64 + 2;

/// The secret shared by all hosts of a cluster.
///
/// `Debug` prints only a fingerprint (the first 4 bytes of SHA-256 of the key), never the key.
/// Comparison is constant-time.
#[derive(Clone)]
pub struct ClusterKey {
    bytes: [u8; KEY_LEN],
}

/// Why a hex string is not a cluster key.
#[derive(Debug, thiserror::Error)]
pub enum ParseKeyError {
    /// The string is not exactly 64 characters long.
    #[error("a cluster key is {expected} hex digits, found {len} characters")]
    Length {
        /// Characters found.
        len: usize,
        /// Characters expected (64).
        expected: usize,
    },
    /// A character is not a hex digit.
    #[error("character {position} of the cluster key is not a hex digit")]
    NotHex {
        /// Zero-based position of the offending character.
        position: usize,
    },
}

/// Why [`ClusterKey::load`] failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadKeyError {
    /// The file could not be opened or read.
    #[error("reading cluster key file {}", .path.display())]
    Read {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The file is larger than a key file can be.
    #[error("cluster key file {} is {len} bytes; a key file is at most {max}", .path.display())]
    TooLarge {
        /// The key file.
        path: PathBuf,
        /// Its size.
        len: u64,
        /// The largest size accepted.
        max: u64,
    },
    /// The file does not hold a key.
    #[error("cluster key file {} is malformed", .path.display())]
    Malformed {
        /// The key file.
        path: PathBuf,
        /// What is wrong with its contents.
        source: ParseKeyError,
    },
}

/// Why [`ClusterKey::save`] failed.
#[derive(Debug, thiserror::Error)]
pub enum SaveKeyError {
    /// The file could not be created or opened for writing.
    #[error("creating cluster key file {}", .path.display())]
    Create {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The file's mode could not be set to 0600.
    #[error("restricting cluster key file {} to mode 0600", .path.display())]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The key could not be written or synced.
    #[error("writing cluster key file {}", .path.display())]
    Write {
        /// The key file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
}

impl ClusterKey {
    /// Draws a new random key from the operating system.
    ///
    /// # Panics
    ///
    /// If the operating system's random source fails (see [`nonce`]).
    pub fn generate() -> ClusterKey {
        ClusterKey { bytes: random() }
    }

    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> ClusterKey {
        ClusterKey { bytes }
    }

    /// Parses 64 hex digits (either case).
    pub fn from_hex(text: &str) -> Result<ClusterKey, ParseKeyError> {
        let digits = text.as_bytes();
        if digits.len() != 2 * KEY_LEN {
            return Err(ParseKeyError::Length {
                len: text.chars().count(),
                expected: 2 * KEY_LEN,
            });
        }
        let mut bytes = [0u8; KEY_LEN];
        for (i, (byte, pair)) in bytes.iter_mut().zip(digits.as_chunks::<2>().0).enumerate() {
            let high = hex_value(pair[0]).ok_or(ParseKeyError::NotHex { position: 2 * i })?;
            let low = hex_value(pair[1]).ok_or(ParseKeyError::NotHex {
                position: 2 * i + 1,
            })?;
            *byte = high << 4 | low;
        }
        Ok(ClusterKey { bytes })
    }

    /// The key as 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut text = String::with_capacity(2 * KEY_LEN);
        for byte in self.bytes {
            text.push(char::from(DIGITS[usize::from(byte >> 4)]));
            text.push(char::from(DIGITS[usize::from(byte & 0xf)]));
        }
        text
    }

    /// Short public identifier of the key: the first 4 bytes of its SHA-256, in hex.
    ///
    /// Lets operators check that two hosts hold the same key without showing it.
    pub fn fingerprint(&self) -> String {
        self.id().to_string()
    }

    /// Reads a key file: 64 hex digits, optionally followed by one line ending.
    ///
    /// Logs a warning if the file can be read by its group or by others.
    pub fn load(path: &Path) -> Result<ClusterKey, LoadKeyError> {
        let read_error = |source| LoadKeyError::Read {
            path: path.to_path_buf(),
            source,
        };
        let mut file = fs::File::open(path).map_err(read_error)?;
        let metadata = file.metadata().map_err(read_error)?;
        let mode = metadata.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format_args!("{:04o}", mode & 0o7777),
                "cluster key file is accessible to group or others; it should be mode 0600"
            );
        }
        if metadata.len() > MAX_KEY_FILE_LEN {
            return Err(LoadKeyError::TooLarge {
                path: path.to_path_buf(),
                len: metadata.len(),
                max: MAX_KEY_FILE_LEN,
            });
        }
        let mut raw = Vec::new();
        // The bound guards against a file that grows between `metadata` and `read`.
        (&mut file)
            .take(MAX_KEY_FILE_LEN + 1)
            .read_to_end(&mut raw)
            .map_err(read_error)?;
        let text = raw.strip_suffix(b"\n").unwrap_or(&raw);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        let malformed = |source| LoadKeyError::Malformed {
            path: path.to_path_buf(),
            source,
        };
        let text = std::str::from_utf8(text).map_err(|e| {
            malformed(ParseKeyError::NotHex {
                position: e.valid_up_to(),
            })
        })?;
        ClusterKey::from_hex(text).map_err(malformed)
    }

    /// Writes the key as 64 hex digits and a newline to a file of mode 0600.
    ///
    /// An existing file is truncated and its mode reset to 0600 before the key is written.
    pub fn save(&self, path: &Path) -> Result<(), SaveKeyError> {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| SaveKeyError::Create {
                path: path.to_path_buf(),
                source,
            })?;
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(|source| SaveKeyError::Permissions {
                path: path.to_path_buf(),
                source,
            })?;
        let mut text = self.to_hex();
        text.push('\n');
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|source| SaveKeyError::Write {
                path: path.to_path_buf(),
                source,
            })
    }

    /// A key for one purpose, derived from this key and `label`: knowing it reveals neither
    /// the cluster key nor the key of any other label.
    pub fn derive(&self, label: &[u8]) -> [u8; KEY_LEN] {
        let mut mac = self.mac();
        mac.update(label);
        mac.finalize().into_bytes().into()
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC zero-pads a key shorter than the hash block (RFC 2104, section 2), so the
        // 32-byte key padded to SHA-256's 64-byte block is the same HMAC key; the fixed-size
        // constructor then has no length to reject.
        let mut block = [0u8; 64];
        block[..KEY_LEN].copy_from_slice(&self.bytes);
        <HmacSha256 as KeyInit>::new(Key::<HmacSha256>::from_slice(&block))
    }
}

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterKey")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

impl PartialEq for ClusterKey {
    fn eq(&self, other: &ClusterKey) -> bool {
        self.bytes.ct_eq(&other.bytes).into()
    }
}

impl Eq for ClusterKey {}

/// The public name of a cluster key: the first 4 bytes of its SHA-256 (its fingerprint).
///
/// Two different keys share an id with probability 2^-32; a host holds at most two keys, and a
/// wrong pick only fails the handshake's proofs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KeyId(pub [u8; KEY_ID_LEN]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl ClusterKey {
    /// This key's [`KeyId`].
    pub fn id(&self) -> KeyId {
        let digest = Sha256::digest(self.bytes);
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&digest[..KEY_ID_LEN]);
        KeyId(id)
    }
}

/// The cluster keys a host proves with and accepts: one [`ClusterKey`], or a
/// [`crate::keyring::KeyRing`] during a rotation.
pub trait KeySource {
    /// The key this host proves with and seals with now.
    fn sending(&self) -> ClusterKey;
    /// The key named `id`, if this host accepts it now.
    fn accepted(&self, id: KeyId) -> Option<ClusterKey>;
}

impl KeySource for ClusterKey {
    fn sending(&self) -> ClusterKey {
        self.clone()
    }

    fn accepted(&self, id: KeyId) -> Option<ClusterKey> {
        (self.id() == id).then(|| self.clone())
    }
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

fn random() -> [u8; 32] {
    let mut bytes = [0u8; 32];
    if let Err(error) = getrandom::fill(&mut bytes) {
        // There is no secure fallback: a predictable nonce or key would defeat the handshake.
        panic!("the operating system's random source failed: {error}");
    }
    bytes
}

/// A fresh random nonce.
///
/// # Panics
///
/// If the operating system's random source (`getrandom(2)`) fails. Linux only fails it on
/// kernels older than 3.17 with no `/dev/urandom`; there is no secure fallback.
pub fn nonce() -> [u8; NONCE_LEN] {
    random()
}

/// Which end of the handshake made a proof.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The end that opened the connection.
    Client,
    /// The end that accepted it.
    Server,
}

impl Role {
    fn byte(self) -> u8 {
        match self {
            Role::Client => b'C',
            Role::Server => b'S',
        }
    }
}

fn bind_exchange(
    mac: &mut HmacSha256,
    context: &[u8],
    client_nonce: &[u8; NONCE_LEN],
    server_nonce: &[u8; NONCE_LEN],
) {
    mac.update(&(context.len() as u64).to_le_bytes());
    mac.update(context);
    mac.update(client_nonce);
    mac.update(server_nonce);
}

fn proof_mac(
    key: &ClusterKey,
    role: Role,
    context: &[u8],
    client_nonce: &[u8; NONCE_LEN],
    server_nonce: &[u8; NONCE_LEN],
) -> HmacSha256 {
    let mut mac = key.mac();
    mac.update(PROOF_LABEL);
    mac.update(&[role.byte()]);
    bind_exchange(&mut mac, context, client_nonce, server_nonce);
    mac
}

/// The proof that `role` holds `key`, bound to the protocol `context` and both nonces.
pub fn proof(
    key: &ClusterKey,
    role: Role,
    context: &[u8],
    client_nonce: &[u8; NONCE_LEN],
    server_nonce: &[u8; NONCE_LEN],
) -> [u8; PROOF_LEN] {
    proof_mac(key, role, context, client_nonce, server_nonce)
        .finalize()
        .into_bytes()
        .into()
}

/// Checks, in constant time, a proof that `role` holds `key`.
///
/// Fails with [`AuthError::BadServerProof`] or [`AuthError::BadClientProof`] (by `role`) if the
/// tag is wrong or has the wrong length.
pub fn verify(
    key: &ClusterKey,
    role: Role,
    context: &[u8],
    client_nonce: &[u8; NONCE_LEN],
    server_nonce: &[u8; NONCE_LEN],
    tag: &[u8],
) -> Result<(), AuthError> {
    proof_mac(key, role, context, client_nonce, server_nonce)
        .verify_slice(tag)
        .map_err(|_| match role {
            Role::Client => AuthError::BadClientProof,
            Role::Server => AuthError::BadServerProof,
        })
}

/// A key for MACing the frames of one authenticated connection.
///
/// Distinct from every proof (different label), and different for every connection (nonces).
pub fn session_key(
    key: &ClusterKey,
    context: &[u8],
    client_nonce: &[u8; NONCE_LEN],
    server_nonce: &[u8; NONCE_LEN],
) -> [u8; SESSION_KEY_LEN] {
    let mut mac = key.mac();
    mac.update(SESSION_LABEL);
    bind_exchange(&mut mac, context, client_nonce, server_nonce);
    mac.finalize().into_bytes().into()
}

/// A step of the handshake, named in errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Client sends HELLO.
    SendHello,
    /// Server reads HELLO.
    ReadHello,
    /// Server sends CHALLENGE.
    SendChallenge,
    /// Client reads CHALLENGE.
    ReadChallenge,
    /// Client sends PROOF.
    SendProof,
    /// Server reads PROOF.
    ReadProof,
    /// Server sends ACCEPT.
    SendAccept,
    /// Client reads ACCEPT.
    ReadAccept,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Step::SendHello => "sending hello",
            Step::ReadHello => "reading hello",
            Step::SendChallenge => "sending challenge",
            Step::ReadChallenge => "reading challenge",
            Step::SendProof => "sending proof",
            Step::ReadProof => "reading proof",
            Step::SendAccept => "sending accept",
            Step::ReadAccept => "reading accept",
        })
    }
}

/// Why an authentication handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Reading or writing the connection failed.
    #[error("{step}")]
    Io {
        /// The step that failed.
        step: Step,
        /// The I/O error.
        source: io::Error,
    },
    /// The peer did not send its part before the connection's read timeout.
    #[error("{step}: timed out")]
    TimedOut {
        /// The step that timed out.
        step: Step,
    },
    /// The client closed the connection in the middle of the handshake.
    #[error("{step}: the client closed the connection")]
    Closed {
        /// The step at which the connection closed.
        step: Step,
    },
    /// The server closed the connection: it refused our hello or our proof (most likely the two
    /// hosts hold different cluster keys, or the server does not serve this protocol).
    #[error("{step}: the server closed the connection (wrong cluster key or protocol?)")]
    Rejected {
        /// The step at which the connection closed.
        step: Step,
    },
    /// The HELLO does not start with [`MAGIC`]: the peer does not speak this protocol.
    #[error("hello has magic {found:02x?}, expected {MAGIC:02x?}")]
    BadMagic {
        /// The first 8 bytes received.
        found: [u8; 8],
    },
    /// The protocol context is empty or longer than [`MAX_CONTEXT_LEN`].
    #[error("protocol context is {len} bytes; it must be 1..={MAX_CONTEXT_LEN}")]
    ContextLength {
        /// Its length.
        len: usize,
    },
    /// The HELLO does not have the length its header announces.
    #[error("hello is {len} bytes; its header announces {expected}")]
    HelloLength {
        /// Bytes given.
        len: usize,
        /// Bytes announced.
        expected: usize,
    },
    /// The client asked for a protocol this server does not serve.
    #[error("client asked for protocol {requested:?}; this server speaks {served:?}")]
    WrongContext {
        /// The context in the HELLO (lossily decoded).
        requested: String,
        /// The context this server serves.
        served: String,
    },
    /// The client proves with a key this server does not hold (or no longer accepts).
    #[error(
        "the client proves with cluster key {id}, which this host does not hold \
         (a key rotation not done on every host?)"
    )]
    UnknownKey {
        /// The id the HELLO names.
        id: KeyId,
    },
    /// The server's proof is wrong: it does not hold our cluster key.
    #[error("the server's proof does not verify (it holds a different cluster key)")]
    BadServerProof,
    /// The client's proof is wrong: it does not hold our cluster key.
    #[error("the client's proof does not verify (it holds a different cluster key)")]
    BadClientProof,
    /// The server answered our proof with something other than [`ACCEPT`].
    #[error("server answered the proof with {byte:#04x}, expected {ACCEPT:#04x}")]
    BadAccept {
        /// The byte received.
        byte: u8,
    },
}

/// A parsed HELLO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello<'a> {
    /// The protocol the client asks for.
    pub context: &'a [u8],
    /// The cluster key the client proves with.
    pub key_id: KeyId,
    /// The client's nonce.
    pub client_nonce: [u8; NONCE_LEN],
}

fn check_context(context: &[u8]) -> Result<(), AuthError> {
    if context.is_empty() || context.len() > MAX_CONTEXT_LEN {
        return Err(AuthError::ContextLength { len: context.len() });
    }
    Ok(())
}

/// Checks the first [`HELLO_HEADER_LEN`] bytes of a HELLO and returns how many bytes follow.
pub fn hello_remaining_len(header: &[u8; HELLO_HEADER_LEN]) -> Result<usize, AuthError> {
    let [magic @ .., context_len] = header;
    if *magic != MAGIC {
        return Err(AuthError::BadMagic { found: *magic });
    }
    let context_len = usize::from(*context_len);
    if context_len == 0 || context_len > MAX_CONTEXT_LEN {
        return Err(AuthError::ContextLength { len: context_len });
    }
    Ok(context_len + KEY_ID_LEN + NONCE_LEN)
}

impl<'a> Hello<'a> {
    /// Builds the HELLO for `context`.
    pub fn new(
        context: &'a [u8],
        key_id: KeyId,
        client_nonce: [u8; NONCE_LEN],
    ) -> Result<Hello<'a>, AuthError> {
        check_context(context)?;
        Ok(Hello {
            context,
            key_id,
            client_nonce,
        })
    }

    /// Parses a complete HELLO (header and body); its length must match exactly.
    pub fn parse(bytes: &'a [u8]) -> Result<Hello<'a>, AuthError> {
        let Some((header, body)) = bytes.split_first_chunk::<HELLO_HEADER_LEN>() else {
            return Err(AuthError::HelloLength {
                len: bytes.len(),
                expected: HELLO_HEADER_LEN,
            });
        };
        let remaining = hello_remaining_len(header)?;
        if body.len() != remaining {
            return Err(AuthError::HelloLength {
                len: bytes.len(),
                expected: HELLO_HEADER_LEN + remaining,
            });
        }
        let short = || AuthError::HelloLength {
            len: bytes.len(),
            expected: HELLO_HEADER_LEN + remaining,
        };
        let (rest, client_nonce) = body.split_last_chunk::<NONCE_LEN>().ok_or_else(short)?;
        let (context, key_id) = rest.split_last_chunk::<KEY_ID_LEN>().ok_or_else(short)?;
        Ok(Hello {
            context,
            key_id: KeyId(*key_id),
            client_nonce: *client_nonce,
        })
    }

    /// The HELLO's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes =
            Vec::with_capacity(HELLO_HEADER_LEN + self.context.len() + KEY_ID_LEN + NONCE_LEN);
        bytes.extend_from_slice(&MAGIC);
        // `new` and `parse` bound the context by MAX_CONTEXT_LEN, which fits in a byte.
        bytes.push(self.context.len() as u8);
        bytes.extend_from_slice(self.context);
        bytes.extend_from_slice(&self.key_id.0);
        bytes.extend_from_slice(&self.client_nonce);
        bytes
    }
}

const _: () = assert!(MAX_CONTEXT_LEN <= u8::MAX as usize);

/// The client's side of the handshake, without I/O.
///
/// Send [`ClientHandshake::hello`], read [`CHALLENGE_LEN`] bytes and pass them to
/// [`ClientHandshake::respond`], send [`ClientAwaitingAccept::proof`], read one byte and pass
/// it to [`ClientAwaitingAccept::accept`]. An EOF while reading is [`AuthError::Rejected`].
#[derive(Debug)]
pub struct ClientHandshake {
    key: ClusterKey,
    context: Vec<u8>,
    client_nonce: [u8; NONCE_LEN],
}

impl ClientHandshake {
    /// Starts a handshake for `context` with a fresh nonce, proving with the key `keys` sends
    /// with now.
    pub fn new(keys: &impl KeySource, context: &[u8]) -> Result<ClientHandshake, AuthError> {
        check_context(context)?;
        Ok(ClientHandshake {
            key: keys.sending(),
            context: context.to_vec(),
            client_nonce: nonce(),
        })
    }

    /// The HELLO to send.
    pub fn hello(&self) -> Vec<u8> {
        Hello {
            context: &self.context,
            key_id: self.key.id(),
            client_nonce: self.client_nonce,
        }
        .encode()
    }

    /// Checks the server's CHALLENGE; on success, the client's proof is ready to send.
    pub fn respond(
        self,
        challenge: &[u8; CHALLENGE_LEN],
    ) -> Result<ClientAwaitingAccept, AuthError> {
        let (server_nonce, server_proof) = challenge.split_at(NONCE_LEN);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(server_nonce);
        verify(
            &self.key,
            Role::Server,
            &self.context,
            &self.client_nonce,
            &nonce,
            server_proof,
        )?;
        Ok(ClientAwaitingAccept {
            proof: proof(
                &self.key,
                Role::Client,
                &self.context,
                &self.client_nonce,
                &nonce,
            ),
            session_key: session_key(&self.key, &self.context, &self.client_nonce, &nonce),
        })
    }
}

/// The client after it verified the server: its proof is to be sent, the ACCEPT awaited.
pub struct ClientAwaitingAccept {
    proof: [u8; PROOF_LEN],
    session_key: [u8; SESSION_KEY_LEN],
}

impl fmt::Debug for ClientAwaitingAccept {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientAwaitingAccept")
            .finish_non_exhaustive()
    }
}

impl ClientAwaitingAccept {
    /// The client's proof, to send to the server.
    pub fn proof(&self) -> &[u8; PROOF_LEN] {
        &self.proof
    }

    /// Checks the server's answer to the proof; returns the session key.
    pub fn accept(self, byte: u8) -> Result<[u8; SESSION_KEY_LEN], AuthError> {
        if byte == ACCEPT {
            Ok(self.session_key)
        } else {
            Err(AuthError::BadAccept { byte })
        }
    }
}

/// The server's side of the handshake, without I/O.
///
/// Read [`HELLO_HEADER_LEN`] bytes, pass them to [`hello_remaining_len`], read that many more,
/// parse the whole with [`Hello::parse`], call [`ServerHandshake::respond`] and send the
/// challenge, read [`PROOF_LEN`] bytes and pass them to [`ServerHandshake::verify_client`],
/// and on success send [`ACCEPT`]. On any error, close the connection without sending more.
pub struct ServerHandshake {
    key: ClusterKey,
    context: Vec<u8>,
    client_nonce: [u8; NONCE_LEN],
    server_nonce: [u8; NONCE_LEN],
}

impl fmt::Debug for ServerHandshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerHandshake")
            .field("context", &String::from_utf8_lossy(&self.context))
            .finish_non_exhaustive()
    }
}

impl ServerHandshake {
    /// Answers a HELLO for the protocol `served` with the key it names, if `keys` accepts it:
    /// returns the CHALLENGE to send.
    pub fn respond(
        keys: &impl KeySource,
        served: &[u8],
        hello: &Hello<'_>,
    ) -> Result<(ServerHandshake, [u8; CHALLENGE_LEN]), AuthError> {
        if hello.context != served {
            return Err(AuthError::WrongContext {
                requested: String::from_utf8_lossy(hello.context).into_owned(),
                served: String::from_utf8_lossy(served).into_owned(),
            });
        }
        let key = &keys
            .accepted(hello.key_id)
            .ok_or(AuthError::UnknownKey { id: hello.key_id })?;
        let server_nonce = nonce();
        let mut challenge = [0u8; CHALLENGE_LEN];
        let (nonce_part, proof_part) = challenge.split_at_mut(NONCE_LEN);
        nonce_part.copy_from_slice(&server_nonce);
        proof_part.copy_from_slice(&proof(
            key,
            Role::Server,
            served,
            &hello.client_nonce,
            &server_nonce,
        ));
        Ok((
            ServerHandshake {
                key: key.clone(),
                context: served.to_vec(),
                client_nonce: hello.client_nonce,
                server_nonce,
            },
            challenge,
        ))
    }

    /// Checks the client's proof; on success, send [`ACCEPT`]. Returns the session key.
    pub fn verify_client(self, tag: &[u8]) -> Result<[u8; SESSION_KEY_LEN], AuthError> {
        verify(
            &self.key,
            Role::Client,
            &self.context,
            &self.client_nonce,
            &self.server_nonce,
            tag,
        )?;
        Ok(session_key(
            &self.key,
            &self.context,
            &self.client_nonce,
            &self.server_nonce,
        ))
    }
}

fn io_error(step: Step, source: io::Error, eof: AuthError) -> AuthError {
    match source.kind() {
        io::ErrorKind::UnexpectedEof => eof,
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => AuthError::TimedOut { step },
        _ => AuthError::Io { step, source },
    }
}

fn client_read(stream: &mut impl Read, buf: &mut [u8], step: Step) -> Result<(), AuthError> {
    stream
        .read_exact(buf)
        .map_err(|source| match source.kind() {
            // A server that refuses us closes; if our own bytes were still unread on its side the
            // kernel turns that close into a reset.
            io::ErrorKind::ConnectionReset => AuthError::Rejected { step },
            _ => io_error(step, source, AuthError::Rejected { step }),
        })
}

fn write(stream: &mut impl Write, bytes: &[u8], step: Step) -> Result<(), AuthError> {
    stream
        .write_all(bytes)
        .and_then(|()| stream.flush())
        .map_err(|source| io_error(step, source, AuthError::Closed { step }))
}

/// Runs the client's side of the handshake on a blocking stream; returns the session key.
///
/// Bound the time it may take with the stream's read and write timeouts.
pub fn client_handshake<S: Read + Write>(
    stream: &mut S,
    key: &impl KeySource,
    context: &[u8],
) -> Result<[u8; SESSION_KEY_LEN], AuthError> {
    let handshake = ClientHandshake::new(key, context)?;
    write(stream, &handshake.hello(), Step::SendHello)?;
    let mut challenge = [0u8; CHALLENGE_LEN];
    client_read(stream, &mut challenge, Step::ReadChallenge)?;
    let awaiting = handshake.respond(&challenge)?;
    write(stream, awaiting.proof(), Step::SendProof)?;
    let mut answer = [0u8; 1];
    client_read(stream, &mut answer, Step::ReadAccept)?;
    awaiting.accept(answer[0])
}

/// Runs the server's side of the handshake on a blocking stream; returns the session key.
///
/// On error nothing more has been sent; the caller should close the stream. Bound the time a
/// silent client may hold the connection with the stream's read timeout.
pub fn server_handshake<S: Read + Write>(
    stream: &mut S,
    key: &impl KeySource,
    context: &[u8],
) -> Result<[u8; SESSION_KEY_LEN], AuthError> {
    let read = |stream: &mut S, buf: &mut [u8], step| {
        stream
            .read_exact(buf)
            .map_err(|source| io_error(step, source, AuthError::Closed { step }))
    };
    let mut header = [0u8; HELLO_HEADER_LEN];
    read(stream, &mut header, Step::ReadHello)?;
    let len = HELLO_HEADER_LEN + hello_remaining_len(&header)?;
    let mut hello = [0u8; HELLO_HEADER_LEN + MAX_CONTEXT_LEN + KEY_ID_LEN + NONCE_LEN];
    hello[..HELLO_HEADER_LEN].copy_from_slice(&header);
    // `hello_remaining_len` bounds the context by MAX_CONTEXT_LEN, so `len` fits the buffer.
    let body = hello
        .get_mut(HELLO_HEADER_LEN..len)
        .ok_or(AuthError::ContextLength { len })?;
    read(stream, body, Step::ReadHello)?;
    let hello = Hello::parse(&hello[..len])?;
    let (handshake, challenge) = ServerHandshake::respond(key, context, &hello)?;
    write(stream, &challenge, Step::SendChallenge)?;
    let mut client_proof = [0u8; PROOF_LEN];
    read(stream, &mut client_proof, Step::ReadProof)?;
    let session = handshake.verify_client(&client_proof)?;
    write(stream, &[ACCEPT], Step::SendAccept)?;
    Ok(session)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::thread;
    use std::time::Duration;

    const TIMEOUT: Duration = Duration::from_secs(5);

    fn key(byte: u8) -> ClusterKey {
        ClusterKey::from_bytes([byte; KEY_LEN])
    }

    #[test]
    fn hex_round_trip_and_errors() {
        let k = ClusterKey::generate();
        assert_eq!(ClusterKey::from_hex(&k.to_hex()).unwrap(), k);
        assert_eq!(ClusterKey::from_hex(&k.to_hex().to_uppercase()).unwrap(), k);
        assert!(matches!(
            ClusterKey::from_hex("abcd"),
            Err(ParseKeyError::Length { len: 4, .. })
        ));
        let mut bad = "0".repeat(63);
        bad.push('g');
        assert!(matches!(
            ClusterKey::from_hex(&bad),
            Err(ParseKeyError::NotHex { position: 63 })
        ));
        // A multi-byte character must not be mistaken for two hex digits or cause a panic.
        let odd = format!("{}é", "0".repeat(62));
        assert!(ClusterKey::from_hex(&odd).is_err());
    }

    #[test]
    fn debug_hides_the_key() {
        let k = key(0xab);
        let shown = format!("{k:?}");
        assert!(!shown.contains(&k.to_hex()));
        assert!(!shown.contains("abab"));
        assert!(shown.contains(&k.fingerprint()));
    }

    #[test]
    fn save_then_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.key");
        let k = ClusterKey::generate();
        k.save(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(ClusterKey::load(&path).unwrap(), k);

        // Saving over a world-readable file makes it private.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        k.save(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        // No newline, and CRLF, are both accepted.
        fs::write(&path, k.to_hex()).unwrap();
        assert_eq!(ClusterKey::load(&path).unwrap(), k);
        fs::write(&path, format!("{}\r\n", k.to_hex())).unwrap();
        assert_eq!(ClusterKey::load(&path).unwrap(), k);
    }

    #[test]
    fn load_rejects_malformed_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.key");
        for contents in [
            &b""[..],
            b"abc\n",
            b"\n",
            &[0xff; 64],
            format!("{}\n\n", "a".repeat(64)).as_bytes(),
            format!(" {}", "a".repeat(64)).as_bytes(),
        ] {
            fs::write(&path, contents).unwrap();
            assert!(
                matches!(ClusterKey::load(&path), Err(LoadKeyError::Malformed { .. })),
                "{contents:?}"
            );
        }
        fs::write(&path, vec![b'a'; 4096]).unwrap();
        assert!(matches!(
            ClusterKey::load(&path),
            Err(LoadKeyError::TooLarge { len: 4096, .. })
        ));
        assert!(matches!(
            ClusterKey::load(&dir.path().join("missing")),
            Err(LoadKeyError::Read { .. })
        ));
    }

    #[test]
    fn proofs_bind_key_role_context_and_nonces() {
        let (k, cn, sn) = (key(1), nonce(), nonce());
        let tag = proof(&k, Role::Client, b"pages", &cn, &sn);
        verify(&k, Role::Client, b"pages", &cn, &sn, &tag).unwrap();
        let other = nonce();
        for result in [
            verify(&key(2), Role::Client, b"pages", &cn, &sn, &tag),
            verify(&k, Role::Client, b"control", &cn, &sn, &tag),
            verify(&k, Role::Client, b"pages", &other, &sn, &tag),
            verify(&k, Role::Client, b"pages", &cn, &other, &tag),
            verify(&k, Role::Client, b"pages", &cn, &sn, &tag[..31]),
            verify(&k, Role::Client, b"pages", &cn, &sn, &[]),
        ] {
            assert!(matches!(result, Err(AuthError::BadClientProof)));
        }
        assert!(matches!(
            verify(&k, Role::Server, b"pages", &cn, &sn, &tag),
            Err(AuthError::BadServerProof)
        ));
        let session = session_key(&k, b"pages", &cn, &sn);
        assert_ne!(session, tag);
        assert_ne!(session, proof(&k, Role::Server, b"pages", &cn, &sn));
        assert_ne!(session, session_key(&k, b"control", &cn, &sn));
    }

    #[test]
    fn hello_round_trip_and_bounds() {
        let hello = Hello::new(b"pages", key(1).id(), nonce()).unwrap();
        let bytes = hello.encode();
        assert_eq!(Hello::parse(&bytes).unwrap(), hello);
        for len in 0..bytes.len() {
            assert!(Hello::parse(&bytes[..len]).is_err());
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(
            Hello::parse(&longer),
            Err(AuthError::HelloLength { .. })
        ));
        let mut bad_magic = bytes.clone();
        bad_magic[0] = b'X';
        assert!(matches!(
            Hello::parse(&bad_magic),
            Err(AuthError::BadMagic { .. })
        ));
        let mut zero_context = bytes.clone();
        zero_context[8] = 0;
        assert!(matches!(
            Hello::parse(&zero_context),
            Err(AuthError::ContextLength { len: 0 })
        ));
        let mut huge_context = bytes;
        huge_context[8] = 200;
        assert!(matches!(
            Hello::parse(&huge_context),
            Err(AuthError::ContextLength { len: 200 })
        ));
        assert!(Hello::new(&[b'x'; MAX_CONTEXT_LEN + 1], key(1).id(), nonce()).is_err());
        assert!(Hello::new(b"", key(1).id(), nonce()).is_err());
    }

    #[test]
    fn hello_parser_survives_random_bytes() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let valid = Hello::new(b"control", key(1).id(), nonce())
            .unwrap()
            .encode();
        for _ in 0..20_000 {
            let mut bytes = valid.clone();
            bytes.truncate((next() % (valid.len() as u64 + 2)) as usize);
            for _ in 0..next() % 4 {
                if !bytes.is_empty() {
                    let at = (next() % bytes.len() as u64) as usize;
                    bytes[at] = next() as u8;
                }
            }
            if let Ok(hello) = Hello::parse(&bytes) {
                assert_eq!(hello.encode(), bytes);
            }
        }
    }

    /// Runs a server handshake on one loopback connection and a client handshake on the other.
    fn handshake(
        client_key: ClusterKey,
        server_key: ClusterKey,
        client_context: &'static [u8],
    ) -> (Result<[u8; 32], AuthError>, Result<[u8; 32], AuthError>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream.set_read_timeout(Some(TIMEOUT)).unwrap();
            server_handshake(&mut stream, &server_key, b"pages")
        });
        let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT).unwrap();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        let client = client_handshake(&mut stream, &client_key, client_context);
        drop(stream);
        (client, server.join().unwrap())
    }

    #[test]
    fn handshake_agrees_on_a_session_key() {
        let (client, server) = handshake(key(7), key(7), b"pages");
        assert_eq!(client.unwrap(), server.unwrap());
    }

    #[test]
    fn handshake_with_different_keys_fails_on_both_sides() {
        let (client, server) = handshake(key(7), key(8), b"pages");
        assert!(matches!(
            client,
            Err(AuthError::Rejected {
                step: Step::ReadChallenge
            })
        ));
        assert!(matches!(server, Err(AuthError::UnknownKey { id }) if id == key(7).id()));
    }

    #[test]
    fn a_server_that_lies_about_its_key_is_caught_by_its_proof() {
        // A HELLO names the key by its public id; a server that accepts any id but does not
        // hold the key cannot make the proof.
        struct Impostor;
        impl KeySource for Impostor {
            fn sending(&self) -> ClusterKey {
                key(8)
            }
            fn accepted(&self, _: KeyId) -> Option<ClusterKey> {
                Some(key(8))
            }
        }
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream.set_read_timeout(Some(TIMEOUT)).unwrap();
            server_handshake(&mut stream, &Impostor, b"pages")
        });
        let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT).unwrap();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        let client = client_handshake(&mut stream, &key(7), b"pages");
        drop(stream);
        assert!(matches!(client, Err(AuthError::BadServerProof)));
        assert!(matches!(
            server.join().unwrap(),
            Err(AuthError::Closed {
                step: Step::ReadProof
            })
        ));
    }

    #[test]
    fn handshake_for_another_protocol_is_refused() {
        let (client, server) = handshake(key(7), key(7), b"control");
        assert!(matches!(
            client,
            Err(AuthError::Rejected {
                step: Step::ReadChallenge
            })
        ));
        assert!(matches!(server, Err(AuthError::WrongContext { .. })));
    }

    #[test]
    fn server_rejects_a_forged_client_proof_silently() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream.set_read_timeout(Some(TIMEOUT)).unwrap();
            server_handshake(&mut stream, &key(1), b"pages")
        });
        let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT).unwrap();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        stream
            .write_all(&Hello::new(b"pages", key(1).id(), nonce()).unwrap().encode())
            .unwrap();
        let mut challenge = [0u8; CHALLENGE_LEN];
        stream.read_exact(&mut challenge).unwrap();
        // Reflect the server's own proof back: the role byte makes it worthless.
        stream.write_all(&challenge[NONCE_LEN..]).unwrap();
        assert!(matches!(
            server.join().unwrap(),
            Err(AuthError::BadClientProof)
        ));
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "server sent {rest:?} after a bad proof");
    }

    #[test]
    fn server_times_out_a_silent_client() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream
                .set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            server_handshake(&mut stream, &key(1), b"pages")
        });
        let stream = TcpStream::connect_timeout(&addr, TIMEOUT).unwrap();
        assert!(matches!(
            server.join().unwrap(),
            Err(AuthError::TimedOut {
                step: Step::ReadHello
            })
        ));
        drop(stream);
    }
}
