//! The `sfd` configuration file (TOML).
//!
//! ```toml
//! [host]
//! name = "h1"
//! state_dir = "/run/snowflock"        # the local API socket sfd.sock lives here
//! [listen]
//! control = "10.77.0.1:7070"          # inter-host control protocol (TCP)
//! pages = "10.77.0.1:7071"            # memory server (TCP)
//! [cluster]
//! key_file = "/etc/snowflock/cluster.key"
//! members = [ { name = "h1", control = "10.77.0.1:7070" },
//!             { name = "h2", control = "10.77.0.2:7070" } ]
//! [limits]
//! clone_slots = 16
//! fetch_timeout_ms = 5000
//! [mcdist]                            # multicast page distribution (docs/mcdist.md)
//! distribution = "mcdist"             # or "unicast": every clone host fetches over TCP
//! port = 7073                         # UDP: requests to this host's server
//! rx_port = 7074                      # UDP: fragments to this host's receiver
//! rx_path = "auto"                    # "sockets", "xdp", or "auto" (xdp, else sockets)
//! xdp_mode = "native"                 # or "generic"
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use snowflock_vmm::memory::{HostPages, RestoredMemory};

/// A failed configuration load.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path} failed")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing {path} failed")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("{path}: {problem}")]
    Invalid {
        path: PathBuf,
        problem: ConfigProblem,
    },
}

/// Configuration text that is not a valid configuration.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("not a valid sfd configuration")]
    Syntax(#[source] toml::de::Error),
    #[error(transparent)]
    Invalid(ConfigProblem),
}

/// A setting that is out of range or inconsistent with another.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigProblem {
    #[error("host name {0:?} must be non-empty without '/' or spaces")]
    HostName(String),
    #[error("cluster member names must be unique")]
    DuplicateMembers,
    #[error("member {member} lists control address {listed} but this host listens on {listening}")]
    ControlAddress {
        member: String,
        listed: SocketAddr,
        listening: SocketAddr,
    },
    #[error("timeouts must be positive")]
    Timeouts,
    #[error("mcdist group_base {0} is not a multicast address")]
    GroupBase(std::net::Ipv4Addr),
    #[error("mcdist port and rx_port must be non-zero and differ")]
    Ports,
    #[error("mcdist mtu {0} is below 576")]
    Mtu(u32),
    #[error("mcdist rates need 0 < initial_rate <= max_rate")]
    Rates,
    #[error("mcdist max_in_flight must be at least 1")]
    MaxInFlight,
    #[error("mcdist send_threads must be 1 to {MAX_SEND_THREADS}")]
    SendThreads,
    #[error("mcdist {name} {size} must be a power of two >= 64")]
    RingSize { name: &'static str, size: u32 },
}

/// Everything `sfd` reads from its configuration file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    pub host: HostSection,
    pub listen: ListenSection,
    pub cluster: ClusterSection,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub mcdist: McdistSection,
    #[serde(default)]
    pub metrics: MetricsSection,
    #[serde(default)]
    pub allocation: AllocationSection,
}

/// Where a ticket's clone slots come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AllocationBackend {
    /// Each member's own `[limits] clone_slots`, spread over the members.
    #[default]
    Static,
    /// An allocation from Slurm per ticket: CPUs on the nodes Slurm grants,
    /// one clone per CPU, released when the ticket is joined or its VM ends.
    Slurm,
}

/// The `[allocation]` section.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllocationSection {
    #[serde(default)]
    pub backend: AllocationBackend,
    /// Longest wait for a grant, in milliseconds; past it the ticket gets
    /// what was granted (possibly nothing).
    #[serde(default = "default_allocation_timeout_ms")]
    pub timeout_ms: u64,
    /// `slurm.conf` for the Slurm commands (`SLURM_CONF`); unset: Slurm's default.
    #[serde(default)]
    pub slurm_conf: Option<PathBuf>,
    /// Partition to allocate in; unset: the cluster's default.
    #[serde(default)]
    pub partition: Option<String>,
}

fn default_allocation_timeout_ms() -> u64 {
    10_000
}

impl Default for AllocationSection {
    fn default() -> Self {
        Self {
            backend: AllocationBackend::Static,
            timeout_ms: default_allocation_timeout_ms(),
            slurm_conf: None,
            partition: None,
        }
    }
}

impl AllocationSection {
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

/// The Prometheus endpoint.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    /// Where `GET /metrics` is served; off when unset. Metrics say what runs
    /// on the host: keep it on loopback or a management network.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSection {
    /// This host's name in the cluster; unique among the members.
    pub name: String,
    /// Runtime directory: the local API socket `sfd.sock` lives here.
    pub state_dir: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenSection {
    /// Inter-host control protocol.
    pub control: SocketAddr,
    /// Memory server: peers fetch frozen parent memory here.
    pub pages: SocketAddr,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// File holding the cluster key as 64 hex characters.
    pub key_file: PathBuf,
    /// Every host of the cluster, this one included.
    #[serde(default)]
    pub members: Vec<Member>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub name: String,
    pub control: SocketAddr,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Clones this host runs at once; by default one per core (see [`host_cores`]).
    #[serde(default = "default_clone_slots")]
    pub clone_slots: u32,
    /// A page not delivered within this time fails the clone waiting for it.
    #[serde(default = "default_fetch_timeout_ms")]
    pub fetch_timeout_ms: u64,
    /// Pages fetched after a faulting page when they hold data and are missing.
    #[serde(default = "default_prefetch_pages")]
    pub prefetch_pages: u32,
    /// A fault that goes to the network also fetches the missing data pages
    /// of its aligned block of this many pages (a power of two; 0: off). The
    /// default, 512, fetches whole 2 MiB blocks, which `huge_cache` then
    /// collapses as they arrive, so clones map them 2 MiB at a time; 16
    /// (64 KiB blocks) waits on smaller transfers and suits a single clone
    /// on a clean network as well.
    #[serde(default = "default_fault_around_pages")]
    pub fault_around_pages: u32,
    /// Hold each 2 MiB block of a host page cache in a huge page once all
    /// its pages arrived, so a hollow clone's first touch maps 2 MiB: as
    /// each block arrives when whole blocks are fetched (`fault_around_pages`
    /// of 512 or more), else when the cache's clones have all ended.
    #[serde(default = "default_true")]
    pub huge_cache: bool,
    /// Skip fetching pages whose contents do not matter (zero, free, fresh).
    #[serde(default = "default_true")]
    pub avoidance: bool,
    /// A peer that stays silent this long is considered lost.
    #[serde(default = "default_peer_timeout_ms")]
    pub peer_timeout_ms: u64,
    /// How local clones hold their parent's state: copied, or a view
    /// mapped in the background as they start.
    #[serde(default)]
    pub populate: PopulateMode,
    /// The host pages behind guest memory: `"huge"` (2 MiB shmem THP where
    /// the kernel's policy allows, the default) or `"base"` (4 KiB).
    #[serde(default = "default_host_pages")]
    pub host_pages: HostPages,
    /// MiB of pages this host keeps in the page caches of clone points none
    /// of whose clones run here any more, for the next clones from the same
    /// checkpoint; past it the cache idle longest goes. 0 keeps none.
    #[serde(default = "default_idle_cache_mib")]
    pub idle_cache_mib: u64,
    /// Whether a hollow clone's view of the pages already in its host page
    /// cache is mapped (read-only) in the background as it starts.
    #[serde(default = "default_true")]
    pub populate_hollow: bool,
}

fn default_clone_slots() -> u32 {
    host_cores()
}

/// The cores this process may run on (at least 1): the default number of clones a host runs at
/// once. A clone is one vCPU, and more runnable vCPUs than cores cost far more than fair sharing
/// where the hypervisor virtualizes in software (PVM; docs/architecture.md has the figure).
pub fn host_cores() -> u32 {
    std::thread::available_parallelism()
        .map_or(1, |cores| u32::try_from(cores.get()).unwrap_or(u32::MAX))
}
fn default_fetch_timeout_ms() -> u64 {
    5000
}
fn default_prefetch_pages() -> u32 {
    3
}
fn default_fault_around_pages() -> u32 {
    512
}
fn default_true() -> bool {
    true
}
fn default_peer_timeout_ms() -> u64 {
    5000
}
/// Huge pages: the hypervisor then maps 2 MiB per first touch, for the
/// parent building its state and for every local clone reading it (a cloned
/// `seqsearch` job ran ~6x faster than on 4 KiB pages under PVM).
fn default_host_pages() -> HostPages {
    HostPages::Huge
}
/// Two 512 MiB clone points kept whole.
fn default_idle_cache_mib() -> u64 {
    1024
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            clone_slots: default_clone_slots(),
            fetch_timeout_ms: default_fetch_timeout_ms(),
            prefetch_pages: default_prefetch_pages(),
            fault_around_pages: default_fault_around_pages(),
            huge_cache: true,
            avoidance: true,
            peer_timeout_ms: default_peer_timeout_ms(),
            populate: PopulateMode::default(),
            host_pages: default_host_pages(),
            idle_cache_mib: default_idle_cache_mib(),
            populate_hollow: true,
        }
    }
}

/// How a local clone holds its parent's state: a view of the parent's
/// pages, mapped in the background as it starts (`supervisor::populate`), or
/// a copy of its own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PopulateMode {
    /// A view, not populated: every first touch faults.
    Off,
    /// A view mapped read-only, sharing the parent's pages: no memory per
    /// clone, the default. Under PVM this saves only the host fault of a
    /// first touch, not the hypervisor's, and every first write still costs
    /// an exit and a copy-on-write fault (on huge pages also the split of the
    /// 2 MiB mapping around it, after which the block's other pages fault
    /// one by one: a cloned `scan` writing one page in eight of 48 MiB took
    /// ~480 ms against ~10 ms on memory of its own).
    #[default]
    Read,
    /// A view mapped as private copies, on a host thread, so the guest's
    /// first writes do not copy, and the hypervisor maps a page's neighbours
    /// with it on a first touch; mapped 4 KiB at a time. A clone point of
    /// such a clone copies every page it holds into its image.
    Write,
    /// Memory of its own, holding a copy of the parent's data pages made
    /// before the clone first runs (on huge pages where the parent's are):
    /// the clone runs as its parent did, with no fault on a first write and
    /// 2 MiB mapped per first touch. For clones that write their state: a
    /// cloned `scan` (48 MiB, one page in eight written) ran ~11 ms on its
    /// copy against ~480 ms on a read-populated view. Costs the copy on the
    /// clone's start (~0.2 ms per MiB here when the kernel has free huge
    /// pages, 1.5-3 ms per MiB when it must compact memory for them) and a
    /// full copy's memory per clone: a job that only reads a large state
    /// is faster on a view.
    Copy,
}

impl PopulateMode {
    /// How a local clone holds its memory in this mode.
    pub fn restored_memory(self) -> RestoredMemory {
        match self {
            PopulateMode::Copy => RestoredMemory::Copy,
            PopulateMode::Off | PopulateMode::Read | PopulateMode::Write => RestoredMemory::View,
        }
    }
}

/// How clone hosts get a clone point's pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Distribution {
    /// Answers go to the family's multicast group: every clone host gets every page once.
    Mcdist,
    /// Each clone host fetches its own pages over its TCP connection (the baseline).
    Unicast,
}

/// Which receive path takes mcdist datagrams off the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RxPath {
    /// Kernel UDP sockets driven by io_uring; always available.
    Sockets,
    /// An XDP program steering fragments to AF_XDP sockets; refuses to start without it.
    Xdp,
    /// AF_XDP when the program attaches and the sockets bind, else kernel sockets (logged).
    Auto,
}

/// How the XDP program is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum XdpAttachMode {
    /// In the driver (veth supports it).
    Native,
    /// In the generic network stack, for drivers without XDP support.
    Generic,
}

/// Multicast page distribution and its receive paths.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McdistSection {
    #[serde(default = "default_distribution")]
    pub distribution: Distribution,
    /// UDP port where this host's mcdist server takes requests, on the pages address.
    #[serde(default = "default_mcdist_port")]
    pub port: u16,
    /// UDP port where this host's receiver takes fragments (group and unicast); the same on
    /// every host, and not `port` (unicast reaches only the more specific bound socket).
    #[serde(default = "default_rx_port")]
    pub rx_port: u16,
    /// First address of the /16 that families' multicast groups are drawn from.
    #[serde(default = "default_group_base")]
    pub group_base: std::net::Ipv4Addr,
    /// Path MTU that fragments are sized for; 0 = the interface's MTU.
    #[serde(default)]
    pub mtu: u32,
    /// A page is sent at most once per this window; requests within it share the send.
    #[serde(default = "default_suppression_ms")]
    pub suppression_ms: u64,
    /// Send rate (pages/s) of a family before its receivers report theirs, and the most
    /// any report may ask for.
    #[serde(default = "default_initial_rate")]
    pub initial_rate: u32,
    #[serde(default = "default_max_rate")]
    pub max_rate: u32,
    /// Push pages before clones ask: multicast the data pages of a clone point served to
    /// other hosts (those written since the previous clone point first) in the background,
    /// behind requested pages, once clone hosts join; and send a late-joining host the pages
    /// its siblings already faulted.
    #[serde(default = "default_true")]
    pub push: bool,
    /// Working sets kept (0, the default: off): what the clones of a clone point asked for,
    /// in order, is recorded when the clone point stops being served, and the same clone
    /// point of the next job of the same image (same bytes, memory size and command line)
    /// pushes those pages first. Off by default: here the push trails the clones' demand,
    /// so pushing in their order mostly sends what they are asking for anyway.
    #[serde(default = "default_recorded_working_sets")]
    pub recorded_working_sets: u32,
    /// Most pages of a family this host's receiver awaits at once; further requested pages
    /// wait here and go out as pages arrive.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: u32,
    /// Threads of this host's mcdist server that send queued pages: more than one helps a
    /// parent host with cores to spare.
    #[serde(default = "default_send_threads")]
    pub send_threads: u32,
    /// Forward error correction of the push: REPAIRs (Reed-Solomon recovery symbols) after
    /// every block of pushed pages, this many percent of its fragments; 0 = none (the
    /// default: on these 2-core hosts 20% and 50% made jobs slower with and without loss).
    /// Above 0, this host's receiver also keeps copies of the pages it completed lately,
    /// which REPAIRs need; set it alike on every host.
    #[serde(default = "default_repair_percent")]
    pub repair_percent: u32,
    #[serde(default = "default_rx_path")]
    pub rx_path: RxPath,
    /// Interface to attach XDP to; empty = the one holding the pages address.
    #[serde(default)]
    pub interface: String,
    #[serde(default = "default_xdp_mode")]
    pub xdp_mode: XdpAttachMode,
    /// RX queues that get an AF_XDP socket; empty = all of the interface's queues.
    #[serde(default)]
    pub queues: Vec<u32>,
    /// UMEM frames per AF_XDP socket, and the fill and RX ring sizes (powers of two).
    #[serde(default = "default_umem_frames")]
    pub umem_frames: u32,
    #[serde(default = "default_ring_size")]
    pub fill_ring: u32,
    #[serde(default = "default_ring_size")]
    pub rx_ring: u32,
    /// Busy-poll budget of the AF_XDP sockets in microseconds; 0 = off.
    #[serde(default)]
    pub busy_poll_us: u32,
}

fn default_distribution() -> Distribution {
    Distribution::Mcdist
}
fn default_mcdist_port() -> u16 {
    7073
}
fn default_rx_port() -> u16 {
    7074
}
fn default_group_base() -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(239, 255, 0, 0)
}
fn default_suppression_ms() -> u64 {
    5
}
fn default_initial_rate() -> u32 {
    50_000
}
fn default_max_rate() -> u32 {
    400_000
}
fn default_recorded_working_sets() -> u32 {
    0
}

fn default_max_in_flight() -> u32 {
    512
}
/// Most send threads `[mcdist] send_threads` may ask for.
pub const MAX_SEND_THREADS: u32 = 64;

fn default_repair_percent() -> u32 {
    0
}
fn default_send_threads() -> u32 {
    1
}
fn default_rx_path() -> RxPath {
    RxPath::Auto
}
fn default_xdp_mode() -> XdpAttachMode {
    XdpAttachMode::Native
}
fn default_umem_frames() -> u32 {
    4096
}
fn default_ring_size() -> u32 {
    2048
}

impl Default for McdistSection {
    fn default() -> Self {
        Self {
            distribution: default_distribution(),
            port: default_mcdist_port(),
            rx_port: default_rx_port(),
            group_base: default_group_base(),
            mtu: 0,
            suppression_ms: default_suppression_ms(),
            initial_rate: default_initial_rate(),
            max_rate: default_max_rate(),
            push: true,
            recorded_working_sets: default_recorded_working_sets(),
            max_in_flight: default_max_in_flight(),
            send_threads: default_send_threads(),
            repair_percent: default_repair_percent(),
            rx_path: default_rx_path(),
            interface: String::new(),
            xdp_mode: default_xdp_mode(),
            queues: Vec::new(),
            umem_frames: default_umem_frames(),
            fill_ring: default_ring_size(),
            rx_ring: default_ring_size(),
            busy_poll_us: 0,
        }
    }
}

impl McdistSection {
    /// The multicast group of a family: spread over the /16 at `group_base`, never its
    /// first or last address.
    pub fn group_of(&self, family: u64) -> std::net::Ipv4Addr {
        let base = u32::from(self.group_base) & 0xffff_0000;
        let index = (family % 0xfffe) as u32 + 1;
        std::net::Ipv4Addr::from(base | index)
    }

    fn check(&self) -> Result<(), ConfigProblem> {
        if !self.group_base.is_multicast() {
            return Err(ConfigProblem::GroupBase(self.group_base));
        }
        if self.port == 0 || self.rx_port == 0 || self.port == self.rx_port {
            return Err(ConfigProblem::Ports);
        }
        if self.mtu != 0 && self.mtu < 576 {
            return Err(ConfigProblem::Mtu(self.mtu));
        }
        if self.initial_rate == 0 || self.max_rate < self.initial_rate {
            return Err(ConfigProblem::Rates);
        }
        if self.max_in_flight == 0 {
            return Err(ConfigProblem::MaxInFlight);
        }
        if !(1..=MAX_SEND_THREADS).contains(&self.send_threads) {
            return Err(ConfigProblem::SendThreads);
        }
        self.check_receive()
    }

    /// Checks the receive path settings (`sf net tune` changes them at run time).
    pub fn check_receive(&self) -> Result<(), ConfigProblem> {
        for (name, size) in [
            ("umem_frames", self.umem_frames),
            ("fill_ring", self.fill_ring),
            ("rx_ring", self.rx_ring),
        ] {
            if !size.is_power_of_two() || size < 64 {
                return Err(ConfigProblem::RingSize { name, size });
            }
        }
        Ok(())
    }
}

impl Limits {
    pub fn fetch_timeout(&self) -> Duration {
        Duration::from_millis(self.fetch_timeout_ms)
    }

    pub fn peer_timeout(&self) -> Duration {
        Duration::from_millis(self.peer_timeout_ms)
    }

    pub fn idle_cache_bytes(&self) -> u64 {
        self.idle_cache_mib.saturating_mul(1 << 20)
    }
}

impl DaemonConfig {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|error| match error {
            ParseError::Syntax(source) => ConfigError::Parse {
                path: path.to_path_buf(),
                source,
            },
            ParseError::Invalid(problem) => ConfigError::Invalid {
                path: path.to_path_buf(),
                problem,
            },
        })
    }

    /// Parses and checks the text of a configuration file.
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        let config: Self = toml::from_str(text).map_err(ParseError::Syntax)?;
        config.check().map_err(ParseError::Invalid)?;
        Ok(config)
    }

    fn check(&self) -> Result<(), ConfigProblem> {
        if self.host.name.is_empty() || self.host.name.contains(['/', ' ']) {
            return Err(ConfigProblem::HostName(self.host.name.clone()));
        }
        let mut names: Vec<&str> = self
            .cluster
            .members
            .iter()
            .map(|m| m.name.as_str())
            .collect();
        names.sort_unstable();
        if names.windows(2).any(|w| w[0] == w[1]) {
            return Err(ConfigProblem::DuplicateMembers);
        }
        if let Some(me) = self
            .cluster
            .members
            .iter()
            .find(|m| m.name == self.host.name)
            && me.control != self.listen.control
        {
            return Err(ConfigProblem::ControlAddress {
                member: me.name.clone(),
                listed: me.control,
                listening: self.listen.control,
            });
        }
        if self.limits.fetch_timeout_ms == 0 || self.limits.peer_timeout_ms == 0 {
            return Err(ConfigProblem::Timeouts);
        }
        self.mcdist.check()
    }

    /// The local API socket.
    pub fn socket_path(&self) -> PathBuf {
        self.host.state_dir.join("sfd.sock")
    }

    /// The other cluster members.
    pub fn peers(&self) -> impl Iterator<Item = &Member> {
        self.cluster
            .members
            .iter()
            .filter(|m| m.name != self.host.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example() {
        let text = r#"
            [host]
            name = "h1"
            state_dir = "/run/snowflock"
            [listen]
            control = "10.77.0.1:7070"
            pages = "10.77.0.1:7071"
            [cluster]
            key_file = "/etc/snowflock/cluster.key"
            members = [ { name = "h1", control = "10.77.0.1:7070" },
                        { name = "h2", control = "10.77.0.2:7070" } ]
            [limits]
            clone_slots = 8
        "#;
        let config: DaemonConfig = toml::from_str(text).unwrap();
        config.check().unwrap();
        assert_eq!(config.limits.clone_slots, 8);
        assert_eq!(config.limits.fetch_timeout_ms, 5000);
        assert_eq!(config.limits.populate, PopulateMode::Read);
        assert_eq!(config.limits.host_pages, HostPages::Huge);
        assert_eq!(
            config.peers().map(|m| m.name.as_str()).collect::<Vec<_>>(),
            ["h2"]
        );
    }

    #[test]
    fn only_copy_gives_a_clone_memory_of_its_own() {
        assert_eq!(PopulateMode::Copy.restored_memory(), RestoredMemory::Copy);
        for mode in [PopulateMode::Off, PopulateMode::Read, PopulateMode::Write] {
            assert_eq!(mode.restored_memory(), RestoredMemory::View);
        }
    }

    #[test]
    fn the_shipped_example_parses_and_checks() {
        let config: DaemonConfig = toml::from_str(include_str!("../../dist/sfd.toml")).unwrap();
        config.check().unwrap();
        assert_eq!(config.limits.clone_slots, host_cores());
        assert_eq!(config.mcdist.max_in_flight, 512);
        assert_eq!(config.mcdist.send_threads, 1);
        assert_eq!(config.limits.populate, PopulateMode::Read);
        assert_eq!(config.limits.host_pages, HostPages::Huge);
        assert_eq!(
            config.metrics.listen,
            Some("127.0.0.1:9464".parse().unwrap())
        );
        let other = include_str!("../../dist/sfd.toml")
            .replace(r#"populate = "read""#, r#"populate = "write""#)
            .replace(r#"host_pages = "huge""#, r#"host_pages = "base""#);
        let config: DaemonConfig = toml::from_str(&other).unwrap();
        assert_eq!(config.limits.populate, PopulateMode::Write);
        assert_eq!(config.limits.host_pages, HostPages::Base);
    }

    #[test]
    fn rejects_unknown_keys_and_duplicate_members() {
        let base = r#"
            [host]
            name = "h1"
            state_dir = "/tmp"
            [listen]
            control = "127.0.0.1:1"
            pages = "127.0.0.1:2"
            [cluster]
            key_file = "/k"
        "#;
        assert!(toml::from_str::<DaemonConfig>(&format!("{base}\nbogus = 1")).is_err());
        let dup = format!(
            "{base}members = [{{ name = \"a\", control = \"127.0.0.1:3\" }}, {{ name = \"a\", control = \"127.0.0.1:4\" }}]"
        );
        let config: DaemonConfig = toml::from_str(&dup).unwrap();
        assert!(config.check().unwrap_err().to_string().contains("unique"));
        let config: DaemonConfig =
            toml::from_str(&format!("{base}\n[mcdist]\nmax_in_flight = 0")).unwrap();
        assert!(
            config
                .check()
                .unwrap_err()
                .to_string()
                .contains("max_in_flight")
        );
        for threads in [0, MAX_SEND_THREADS + 1] {
            let config: DaemonConfig =
                toml::from_str(&format!("{base}\n[mcdist]\nsend_threads = {threads}")).unwrap();
            assert!(
                config
                    .check()
                    .unwrap_err()
                    .to_string()
                    .contains("send_threads")
            );
        }
    }
}
