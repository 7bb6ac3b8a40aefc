//! Test hosts for the XDP program: two private network namespaces joined by a veth pair, threads
//! that run inside either namespace, crafted mcdist datagrams and a receiving socket that
//! remembers what it got.
//!
//! Traffic only goes between the two namespaces this module creates (10.77.0.0/24 inside them).

use std::fs::File;
use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use snowflock_ebpf::abi;

/// The mcdist port the tests attach the program for.
pub const MCDIST_PORT: u16 = 7073;
/// Longest wait for a datagram or a counter that should come.
pub const WAIT: Duration = Duration::from_secs(5);

const SENDER_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const RECEIVER_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const IP_TIMEOUT: Duration = Duration::from_secs(10);

/// Two namespaces joined by veth: the sender's end and the receiver's end, where the program is
/// attached. Dropping it (also while a test panics) deletes both namespaces and with them the
/// veth pair.
#[derive(Debug)]
pub struct Testbed {
    pub sender_ns: String,
    pub receiver_ns: String,
    pub receiver_if: String,
}

impl Testbed {
    /// Creates the namespaces and links, named `sfe<pid>x<n>...` to be unique per run.
    pub fn new() -> Testbed {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let prefix = format!(
            "sfe{}x{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let bed = Testbed {
            sender_ns: format!("{prefix}s"),
            receiver_ns: format!("{prefix}r"),
            receiver_if: format!("{prefix}r"),
        };
        let sender_if = format!("{prefix}s");
        // The guard exists before the first namespace, so a failure below cleans up too.
        ip(&["netns", "add", &bed.sender_ns]);
        ip(&["netns", "add", &bed.receiver_ns]);
        ip(&[
            "-n",
            &bed.sender_ns,
            "link",
            "add",
            &sender_if,
            "type",
            "veth",
            "peer",
            "name",
            &bed.receiver_if,
            "netns",
            &bed.receiver_ns,
        ]);
        for (ns, ifname, addr) in [
            (&bed.sender_ns, &sender_if, SENDER_ADDR),
            (&bed.receiver_ns, &bed.receiver_if, RECEIVER_ADDR),
        ] {
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                ifname,
            ]);
            ip(&["-n", ns, "link", "set", ifname, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        bed
    }

    /// Runs `f` on a thread inside the receiver's namespace.
    pub fn in_receiver<R: Send + 'static>(&self, f: impl FnOnce() -> R + Send + 'static) -> R {
        in_netns(&self.receiver_ns, f)
    }

    /// The id and mode keyword (`xdp`, `xdpgeneric`) of the XDP program attached to the
    /// receiver's interface, as `ip -d link show` reports it.
    pub fn attached_program(&self) -> Option<(u32, String)> {
        let output = ip(&[
            "-n",
            &self.receiver_ns,
            "-d",
            "link",
            "show",
            "dev",
            &self.receiver_if,
        ]);
        let id = output
            .split("prog/xdp id ")
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        let mode = output
            .lines()
            .next()?
            .split_whitespace()
            .find(|word| word.starts_with("xdp"))?
            .to_owned();
        Some((id, mode))
    }

    /// Polls [`Self::attached_program`] until no program is attached, for at most [`WAIT`].
    pub fn wait_until_detached(&self) -> bool {
        let deadline = Instant::now() + WAIT;
        loop {
            if self.attached_program().is_none() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// A socket in the sender's namespace and one on [`MCDIST_PORT`] in the receiver's.
    pub fn endpoints(&self) -> Endpoints {
        let sender = in_netns(&self.sender_ns, || {
            UdpSocket::bind(SocketAddrV4::new(SENDER_ADDR, 0)).expect("bind the sender")
        });
        Endpoints {
            sender,
            mcdist: self.receiver(MCDIST_PORT),
        }
    }

    /// A socket on `port` in the receiver's namespace.
    pub fn receiver(&self, port: u16) -> Receiver {
        self.in_receiver(move || Receiver::bind(port))
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for ns in [&self.sender_ns, &self.receiver_ns] {
            if let Err(error) = try_ip(&["netns", "del", ns]) {
                eprintln!("cleanup: {error}");
            }
        }
    }
}

/// The sending socket and the mcdist port's receiving socket of a [`Testbed`].
#[derive(Debug)]
pub struct Endpoints {
    pub sender: UdpSocket,
    pub mcdist: Receiver,
}

impl Endpoints {
    /// Sends `datagram` to `port` of the receiver.
    pub fn send(&self, port: u16, datagram: &[u8]) {
        let sent = self
            .sender
            .send_to(datagram, SocketAddrV4::new(RECEIVER_ADDR, port))
            .expect("send a datagram");
        assert_eq!(sent, datagram.len());
    }
}

/// A UDP socket in the receiver's namespace that keeps every datagram it got.
#[derive(Debug)]
pub struct Receiver {
    socket: UdpSocket,
    seen: Vec<Vec<u8>>,
}

impl Receiver {
    fn bind(port: u16) -> Receiver {
        let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
            .expect("bind a receiver");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("set a read timeout");
        Receiver {
            socket,
            seen: Vec::new(),
        }
    }

    /// Waits up to [`WAIT`] for `datagram`; whether it arrived.
    pub fn wait_for(&mut self, datagram: &[u8]) -> bool {
        let deadline = Instant::now() + WAIT;
        loop {
            if self.seen.iter().any(|d| d == datagram) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            self.receive_one();
        }
    }

    /// Whether `datagram` arrived, after taking in what is queued now.
    pub fn has_seen(&mut self, datagram: &[u8]) -> bool {
        while self.receive_one() {}
        self.seen.iter().any(|d| d == datagram)
    }

    /// Receives one datagram if one comes within the read timeout.
    fn receive_one(&mut self) -> bool {
        let mut buffer = vec![0; 65536];
        match self.socket.recv(&mut buffer) {
            Ok(len) => {
                buffer.truncate(len);
                self.seen.push(buffer);
                true
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                false
            }
            Err(e) => panic!("receive failed: {e}"),
        }
    }
}

/// Builds mcdist datagrams (with a zero tag: the program does not check tags); each carries a
/// distinct payload so that tests can tell them apart.
#[derive(Debug, Default)]
pub struct Datagrams {
    serial: u32,
}

impl Datagrams {
    /// A version-1 datagram of `kind` with a 64-byte body after the fragment header.
    pub fn mcdist(&mut self, kind: u8, family: u64, generation: u32, page: u64) -> Vec<u8> {
        self.serial += 1;
        let mut datagram = vec![0; abi::MCDIST_FRAGMENT_OFFSET_PAYLOAD + 64 + abi::MCDIST_TAG_LEN];
        datagram[abi::MCDIST_OFFSET_MAGIC..][..4].copy_from_slice(&abi::MCDIST_MAGIC.to_le_bytes());
        datagram[abi::MCDIST_OFFSET_VERSION] = abi::MCDIST_VERSION;
        datagram[abi::MCDIST_OFFSET_KIND] = kind;
        datagram[abi::MCDIST_OFFSET_FAMILY..][..8].copy_from_slice(&family.to_le_bytes());
        datagram[abi::MCDIST_OFFSET_GENERATION..][..4].copy_from_slice(&generation.to_le_bytes());
        datagram[abi::MCDIST_OFFSET_PAGE..][..8].copy_from_slice(&page.to_le_bytes());
        // count 1, len 64: a well-formed fragment.
        datagram[33] = 1;
        datagram[34..36].copy_from_slice(&64u16.to_le_bytes());
        datagram[abi::MCDIST_FRAGMENT_OFFSET_PAYLOAD..][..4]
            .copy_from_slice(&self.serial.to_le_bytes());
        datagram
    }

    /// A FRAGMENT of `page` of `family` at `generation`.
    pub fn fragment(&mut self, family: u64, generation: u32, page: u64) -> Vec<u8> {
        self.mcdist(abi::MCDIST_KIND_FRAGMENT, family, generation, page)
    }
}

/// Runs `f` on a new thread that first joins network namespace `ns`; panics propagate.
pub fn in_netns<R: Send + 'static>(ns: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    let ns = ns.to_owned();
    let worker = thread::spawn(move || {
        enter_netns(&ns);
        f()
    });
    worker
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Moves the calling thread into network namespace `ns` (made by `ip netns add`).
pub fn enter_netns(ns: &str) {
    let handle = File::open(format!("/run/netns/{ns}")).expect("open the namespace");
    // SAFETY: setns only reads the descriptor, which `handle` keeps open across the call, and
    // changes nothing but the calling thread's network namespace.
    let result = unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(result, 0, "setns: {}", io::Error::last_os_error());
}

fn ip(args: &[&str]) -> String {
    try_ip(args).unwrap_or_else(|error| panic!("{error}"))
}

/// Runs `ip ARGS`, killed after [`IP_TIMEOUT`]; its stdout, or what went wrong.
fn try_ip(args: &[&str]) -> Result<String, String> {
    let line = format!("ip {}", args.join(" "));
    let mut child = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("`{line}` could not start: {e}"))?;
    let deadline = Instant::now() + IP_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(5)),
            outcome => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("`{line}` did not finish: {outcome:?}"));
            }
        }
    };
    // `ip` output is small: it fits the pipe buffers, so reading after exit cannot block.
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stdout.take() {
        let _ = pipe.read_to_string(&mut stdout);
    }
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    if status.success() {
        Ok(stdout)
    } else {
        Err(format!("`{line}` failed ({status}): {}", stderr.trim()))
    }
}
