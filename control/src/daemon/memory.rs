//! Glue between memory images, the page transport and the fault handler:
//! the memory server reads frozen images through [`ImageStore`]; a clone
//! host fetches a clone point's pages through one [`FetchLink`] per family.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use snowflock_dataplane::auth::{KeyId, KeySource};
use snowflock_dataplane::client::{PageClient, PageSink};
use snowflock_dataplane::mcast::{FamilyJoin, McastReceiver};
use snowflock_dataplane::server::PageStore;
use snowflock_fault_handler::{Family, FetchConfig, PageSource};
use snowflock_vmm::memory::{MemoryImage, PAGE_SIZE, PageRuns};

use crate::protocol::McastOrder;
use crate::sync::lock;

/// A frozen image as the memory server reads it.
#[derive(Debug)]
pub struct ImageStore(pub Arc<MemoryImage>);

impl PageStore for ImageStore {
    fn page_count(&self) -> u64 {
        self.0.size() / PAGE_SIZE
    }

    fn read_page(&self, page: u64, buf: &mut [u8; 4096]) -> std::io::Result<()> {
        let addr = page
            .checked_mul(PAGE_SIZE)
            .ok_or_else(|| std::io::Error::other("page index overflows"))?;
        self.0.read(addr, buf).map_err(std::io::Error::other)
    }

    /// The image's data pages (zero pages are never worth sending): first those the VM wrote
    /// since its previous clone point (the newest layer, which the children are likeliest to
    /// touch first), then the rest in address order.
    fn push_runs(&self) -> Vec<(u64, u64)> {
        let ordered = self.0.data_pages().and_then(|mut data| {
            let recent = self.0.newest_layer_data_pages()?;
            let mut runs = Vec::new();
            if let Some(recent) = recent {
                for &(start, count) in recent.runs() {
                    data.set_range(start, count, false);
                    runs.push((start, count));
                }
            }
            runs.extend_from_slice(PageRuns::from_bitmap(&data).runs());
            Ok(runs)
        });
        ordered.unwrap_or_else(|e| {
            tracing::warn!("finding the pages to push failed; pushing none: {e}");
            Vec::new()
        })
    }
}

/// Requests go to the page client once it is connected; the client needs
/// the family (its sink) to exist first.
#[derive(Debug, Default)]
struct ClientSource(OnceLock<PageClient>);

impl PageSource for ClientSource {
    fn request(&self, _family: u64, pages: &[u64]) {
        match self.0.get() {
            Some(client) => {
                if let Err(e) = client.request(pages) {
                    tracing::warn!("page request failed: {}", crate::error_chain(&e));
                }
            }
            None => tracing::error!("page request before the page client connected"),
        }
    }
}

/// The family's way to its page client by unicast. Weak: the client's sink holds the family,
/// so a strong reference would make a cycle that kept the family, its cache and the
/// connection (with its receiver thread) alive after the family's [`FetchLink`] is gone.
#[derive(Debug)]
struct UnicastSource(Weak<ClientSource>);

impl PageSource for UnicastSource {
    fn request(&self, family: u64, pages: &[u64]) {
        if let Some(client) = self.0.upgrade() {
            client.request(family, pages);
        }
    }
}

/// Delivers what a transport receives to the family's clones.
#[derive(Debug)]
pub struct FamilySink(pub Arc<Family>);

impl PageSink for FamilySink {
    fn deliver_batch(&self, pages: &[(u64, &[u8])]) {
        self.0.deliver_batch(pages);
    }

    fn deliver_parts(&self, pages: &[(u64, &[&[u8]])]) {
        self.0.deliver_parts(pages);
    }

    fn failed(&self, reason: String) {
        self.0.fail(reason);
    }
}

/// A failure to set up fetching from a parent's memory server.
#[derive(Debug, thiserror::Error)]
pub enum FetchLinkError {
    #[error("creating the host page cache failed")]
    Cache(#[from] snowflock_fault_handler::CacheError),
    #[error("starting the local page server thread failed")]
    Thread(#[source] std::io::Error),
    #[error("joining the family's multicast group failed")]
    Join(#[source] snowflock_dataplane::mcast::JoinError),
    #[error("connecting to the memory server at {addr} failed")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: snowflock_dataplane::client::ConnectError,
    },
}

/// Requests go to the host's mcdist receiver; answers reach the family
/// through the sink it joined with.
#[derive(Debug)]
struct McastSource(Weak<McastReceiver>);

impl PageSource for McastSource {
    fn request(&self, family: u64, pages: &[u64]) {
        if let Some(receiver) = self.0.upgrade() {
            receiver.request(family, pages);
        }
    }
}

/// The pages of one clone point on this host, and the connection that
/// fetches the missing ones.
///
/// By unicast, pages come over the TCP connection to the parent's memory
/// server. By mcdist, requests and pages go through the host's receiver,
/// and the TCP connection only tells that the parent's host is alive:
/// when it closes, the family fails at once instead of at its fetch
/// timeout.
#[derive(Debug)]
pub struct FetchLink {
    pub family: Arc<Family>,
    /// Holds the TCP connection (its only owner).
    _connection: Arc<ClientSource>,
    /// The host's receiver, when pages come by mcdist.
    receiver: Option<Arc<McastReceiver>>,
    /// Whether the family is joined on `receiver`.
    membership: Mutex<Membership>,
}

/// A [`FetchLink`]'s membership of its family's multicast group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Membership {
    Never,
    Joined,
    /// Left, with the cache kept: a later JOIN says the host holds its pages.
    Left,
}

impl FetchLink {
    /// Whether its pages come by mcdist rather than over its TCP connection.
    pub fn by_multicast(&self) -> bool {
        self.receiver.is_some()
    }

    /// Fetches `family_id` from the memory server at `server`: by mcdist
    /// through `mcast` when given, else over the TCP connection.
    pub fn connect(
        family_id: u64,
        mem_size: u64,
        server: SocketAddr,
        key: &impl KeySource,
        config: FetchConfig,
        mcast: Option<(&Arc<McastReceiver>, McastOrder)>,
    ) -> Result<Self, FetchLinkError> {
        let client_source = Arc::new(ClientSource::default());
        let source: Arc<dyn PageSource> = match &mcast {
            Some((receiver, _)) => Arc::new(McastSource(Arc::downgrade(receiver))),
            None => Arc::new(UnicastSource(Arc::downgrade(&client_source))),
        };
        let family = Family::new(family_id, mem_size, source, config)?;
        let sink = Arc::new(FamilySink(family.clone()));
        let client = PageClient::connect(server, key, family_id, sink, Duration::from_secs(3))
            .map_err(|source| FetchLinkError::Connect {
                addr: server,
                source,
            })?;
        // Nothing else sets it: `client_source` was created above.
        let _ = client_source.0.set(client);
        let (receiver, order) = mcast.map(|(r, order)| (r.clone(), order)).unzip();
        let link = Self {
            family,
            _connection: client_source,
            receiver,
            membership: Mutex::new(Membership::Never),
        };
        link.join_group(order)?;
        Ok(link)
    }

    /// Joins the family's multicast group as `order` says (its generation
    /// may be newer than an earlier join's), unless it is joined or pages
    /// come by unicast. Joining again tells the server that this host holds
    /// what it received before, so nothing is pushed again.
    pub fn join_group(&self, order: Option<McastOrder>) -> Result<(), FetchLinkError> {
        let (Some(receiver), Some(order)) = (&self.receiver, order) else {
            return Ok(());
        };
        let mut membership = lock(&self.membership);
        if *membership == Membership::Joined {
            return Ok(());
        }
        receiver
            .join(
                FamilyJoin {
                    family: self.family.id(),
                    generation: order.generation,
                    key: KeyId(order.key),
                    group: order.group,
                    server: order.server,
                    pages: self.family.cache().page_count(),
                    holding: *membership == Membership::Left,
                },
                Arc::new(FamilySink(self.family.clone())),
            )
            .map_err(FetchLinkError::Join)?;
        *membership = Membership::Joined;
        Ok(())
    }

    /// Leaves the family's multicast group: the parent's host stops
    /// pushing pages here; the cache stays.
    pub fn leave_group(&self) {
        let mut membership = lock(&self.membership);
        if let Some(receiver) = &self.receiver
            && *membership == Membership::Joined
        {
            receiver.leave(self.family.id());
            *membership = Membership::Left;
        }
    }
}

impl Drop for FetchLink {
    fn drop(&mut self) {
        self.leave_group();
    }
}

/// Serves a family's page requests from an image on this host, on a thread
/// of its own: the fault path of a hollow clone without the network, the
/// baseline the remote fault path is measured against.
#[derive(Debug)]
pub struct LocalImageSource {
    requests: std::sync::mpsc::Sender<Vec<u64>>,
}

impl LocalImageSource {
    /// A family whose missing pages come from `image`.
    pub fn family(
        image: Arc<MemoryImage>,
        family_id: u64,
        config: FetchConfig,
    ) -> Result<Arc<Family>, FetchLinkError> {
        let (requests, queue) = std::sync::mpsc::channel::<Vec<u64>>();
        let source = Arc::new(Self { requests });
        let family = Family::new(family_id, image.size(), source, config)?;
        let weak = Arc::downgrade(&family);
        std::thread::Builder::new()
            .name("sf-local-pages".into())
            .spawn(move || {
                let mut buf = vec![0u8; PAGE_SIZE as usize];
                while let Ok(pages) = queue.recv() {
                    let Some(family) = weak.upgrade() else { break };
                    let mut data = Vec::with_capacity(pages.len());
                    for &page in &pages {
                        match image.read(page * PAGE_SIZE, &mut buf) {
                            Ok(()) => data.push((page, buf.clone())),
                            Err(e) => {
                                family.fail(format!("reading page {page:#x} failed: {e}"));
                                return;
                            }
                        }
                    }
                    let batch: Vec<(u64, &[u8])> =
                        data.iter().map(|(p, d)| (*p, d.as_slice())).collect();
                    family.deliver_batch(&batch);
                }
            })
            .map_err(FetchLinkError::Thread)?;
        Ok(family)
    }
}

impl PageSource for LocalImageSource {
    fn request(&self, _family: u64, pages: &[u64]) {
        // The server thread ends only with the family, which owns this source.
        let _ = self.requests.send(pages.to_vec());
    }
}
