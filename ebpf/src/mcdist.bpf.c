// SPDX-License-Identifier: Apache-2.0
/*
 * snowflock mcdist XDP program.
 *
 * Steers IPv4 UDP datagrams to the mcdist port that carry version-2 FRAGMENTs
 * of a registered family and generation: fragments of pages the host already
 * holds (a bit in `presence`) are dropped, the rest go to the AF_XDP socket of
 * their RX queue (`xsks`), or to the kernel when that queue has none.
 * Everything else passes to the kernel untouched. Tags are not checked here:
 * the receiver verifies every datagram it gets.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "../include/mcdist.h"

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "mcdist fields are little-endian and read in host order"
#endif

/* IPv4 fragment flags in iphdr.frag_off (host order, before bpf_htons). */
#define IP_MORE_FRAGMENTS 0x2000
#define IP_FRAGMENT_OFFSET 0x1fff

/* The fixed part of a FRAGMENT datagram that the program reads. */
struct mcdist_fragment_header {
	__u32 magic;
	__u8 version;
	__u8 kind;
	__u16 flags;
	__u64 family;
	__u32 generation;
	__u32 sender;
	__u64 page;
	__u8 index;
	__u8 count;
	__u16 len;
	__u16 offset;
	__u16 reserved;
	__u8 nonce[12];
} __attribute__((packed));

_Static_assert(__builtin_offsetof(struct mcdist_fragment_header, magic) == MCDIST_OFFSET_MAGIC, "magic");
_Static_assert(__builtin_offsetof(struct mcdist_fragment_header, version) == MCDIST_OFFSET_VERSION, "version");
_Static_assert(__builtin_offsetof(struct mcdist_fragment_header, kind) == MCDIST_OFFSET_KIND, "kind");
_Static_assert(__builtin_offsetof(struct mcdist_fragment_header, family) == MCDIST_OFFSET_FAMILY, "family");
_Static_assert(__builtin_offsetof(struct mcdist_fragment_header, generation) == MCDIST_OFFSET_GENERATION, "generation");
_Static_assert(__builtin_offsetof(struct mcdist_fragment_header, page) == MCDIST_OFFSET_PAGE, "page");
_Static_assert(sizeof(struct mcdist_fragment_header) == MCDIST_FRAGMENT_OFFSET_PAYLOAD, "fragment header");
_Static_assert(MCDIST_FRAGMENT_MIN_LEN == MCDIST_FRAGMENT_OFFSET_PAYLOAD + 1 + MCDIST_TAG_LEN, "minimum fragment");

/* Value of `families`; the loader writes the same layout (abi::FamilyEntry). */
struct family_entry {
	__u32 generation;
	__u32 reserved;
	__u64 base_bit;
	__u64 pages;
};

/* Patched by the loader before the program is loaded. */
const volatile __u16 mcdist_port = 0;

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, FAMILIES_MAX);
	__type(key, __u64);
	__type(value, struct family_entry);
} families SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, PRESENCE_WORDS);
	__type(key, __u32);
	__type(value, __u64);
} presence SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, XSKS_MAX);
	__type(key, __u32);
	__type(value, __u32);
} xsks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, COUNTER_COUNT);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

static __always_inline void count(__u32 index)
{
	__u64 *value = bpf_map_lookup_elem(&counters, &index);

	if (value)
		__sync_fetch_and_add(value, 1);
}

/* Decides the fate of a UDP payload sent to the mcdist port. */
static __always_inline int steer_datagram(struct xdp_md *ctx, void *payload, void *data_end, __u16 udp_len)
{
	struct mcdist_fragment_header *header = payload;

	if (payload + MCDIST_KIND_END > data_end) {
		count(COUNTER_MALFORMED);
		return XDP_PASS;
	}
	if (header->magic != MCDIST_MAGIC || header->version != MCDIST_VERSION) {
		count(COUNTER_MALFORMED);
		return XDP_PASS;
	}
	if (header->kind != MCDIST_KIND_FRAGMENT) {
		count(COUNTER_PASSED_NOT_OURS);
		return XDP_PASS;
	}
	/* udp_len bounds the datagram; data_end bounds what this buffer holds. */
	if (udp_len < sizeof(struct udphdr) + MCDIST_FRAGMENT_MIN_LEN ||
	    payload + sizeof(*header) > data_end) {
		count(COUNTER_MALFORMED);
		return XDP_PASS;
	}

	__u64 family = header->family;
	__u32 generation = header->generation;
	__u64 page = header->page;
	struct family_entry *entry = bpf_map_lookup_elem(&families, &family);

	if (!entry || entry->generation != generation || page >= entry->pages) {
		count(COUNTER_PASSED_NOT_OURS);
		return XDP_PASS;
	}

	/*
	 * One fragment per datagram, or the kernel's UDP stack cuts it: generic XDP on a
	 * virtual link sees a UDP GSO batch of several fragments as one datagram, too big for
	 * a UMEM frame. Its UDP length covers more than the first fragment.
	 */
	if (udp_len != sizeof(struct udphdr) + MCDIST_FRAGMENT_OFFSET_PAYLOAD + header->len + MCDIST_TAG_LEN) {
		count(COUNTER_PASSED);
		return XDP_PASS;
	}

	__u64 bit = entry->base_bit + page;

	if (bit >= (__u64)PRESENCE_WORDS * 64) {
		count(COUNTER_PASSED_NOT_OURS);
		return XDP_PASS;
	}

	__u32 word_index = bit / 64;
	__u64 *word = bpf_map_lookup_elem(&presence, &word_index);

	if (!word) {
		count(COUNTER_PASSED_NOT_OURS);
		return XDP_PASS;
	}
	/* The receiver sets bits concurrently; one aligned load sees old or new. */
	if (*(volatile __u64 *)word & (1ULL << (bit % 64))) {
		count(COUNTER_DUPLICATE_DROPPED);
		return XDP_DROP;
	}

	long action = bpf_redirect_map(&xsks, ctx->rx_queue_index, XDP_PASS);

	count(action == XDP_REDIRECT ? COUNTER_REDIRECTED : COUNTER_PASSED);
	return action;
}

SEC("xdp")
int mcdist_steer(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;

	struct iphdr *ip = (void *)(eth + 1);

	if ((void *)(ip + 1) > data_end || ip->protocol != IPPROTO_UDP)
		return XDP_PASS;
	/* Only whole datagrams: later fragments have no UDP header, the first lacks the rest. */
	if (ip->frag_off & bpf_htons(IP_MORE_FRAGMENTS | IP_FRAGMENT_OFFSET))
		return XDP_PASS;

	__u32 ip_header_len = ip->ihl * 4;

	if (ip_header_len < sizeof(*ip))
		return XDP_PASS;

	struct udphdr *udp = (void *)ip + ip_header_len;

	if ((void *)(udp + 1) > data_end || udp->dest != bpf_htons(mcdist_port))
		return XDP_PASS;

	count(COUNTER_RECEIVED);
	return steer_datagram(ctx, udp + 1, data_end, bpf_ntohs(udp->len));
}

/* The program uses no GPL-only helpers. */
char LICENSE[] SEC("license") = "Apache-2.0";
