// SPDX-License-Identifier: Apache-2.0
/*
 * Packet mangling on a test switch port (tc egress, TCX): duplicates and
 * corrupts a random share of the IPv4 UDP datagrams the switch forwards to a
 * host. The HTB root of the same port (impair.rs) loses and holds back packets
 * after this hook, duplicates included.
 *
 * A duplicate is a clone sent out of the same port (bpf_clone_redirect); it
 * passes this hook a second time with DUPLICATE_MARK set and goes on
 * untouched. A corruption flips one bit of a 16-bit word of the UDP payload
 * (within its first 1 KiB: the first datagram of a UDP GSO message) and
 * updates the UDP checksum to match (bpf_l4_csum_replace; a zero checksum
 * stays zero), so that the datagram still passes the kernel's UDP checks and
 * only the receiver's authentication can refuse it.
 */
#include <stddef.h>
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* Random draws below these thresholds duplicate, and corrupt, a datagram. */
volatile const __u32 duplicate_below = 0;
volatile const __u32 corrupt_below = 0;

/* skb->mark of a duplicate on its second pass. */
#define DUPLICATE_MARK 0x5f0d0b1e
/* Corrupted words lie in the first this many bytes of the UDP payload. */
#define CORRUPT_SPAN 1024

/* Indices of `counters`; mangle.rs reads them in this order. */
enum counter {
	COUNTER_UDP,
	COUNTER_DUPLICATED,
	COUNTER_CORRUPTED,
	COUNTER_COUNT,
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
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

/* Flips one random bit of a random 16-bit word of the UDP payload at `udp`. */
static __always_inline void corrupt(struct __sk_buff *skb, __u32 udp)
{
	__u32 draw = bpf_get_prandom_u32();
	/* Even offsets from the UDP header keep the word aligned for the checksum. */
	__u32 offset = udp + sizeof(struct udphdr) + ((draw % CORRUPT_SPAN) & ~1u);
	__u16 old_word, new_word;

	if (offset + sizeof(old_word) > skb->len)
		return;
	if (bpf_skb_load_bytes(skb, offset, &old_word, sizeof(old_word)))
		return;
	new_word = old_word ^ (__u16)(1u << ((draw >> 16) & 15));
	if (bpf_skb_store_bytes(skb, offset, &new_word, sizeof(new_word), BPF_F_RECOMPUTE_CSUM))
		return;
	if (bpf_l4_csum_replace(skb, udp + offsetof(struct udphdr, check), old_word, new_word,
				BPF_F_MARK_MANGLED_0 | sizeof(new_word)))
		return;
	count(COUNTER_CORRUPTED);
}

SEC("classifier")
int mangle(struct __sk_buff *skb)
{
	__u8 version_ihl, protocol;
	__u32 udp;

	if (skb->mark == DUPLICATE_MARK) {
		skb->mark = 0;
		return TC_ACT_OK;
	}
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &version_ihl, 1) ||
	    bpf_skb_load_bytes(skb, ETH_HLEN + offsetof(struct iphdr, protocol), &protocol, 1))
		return TC_ACT_OK;
	if (protocol != IPPROTO_UDP)
		return TC_ACT_OK;
	udp = ETH_HLEN + (version_ihl & 0x0f) * 4;
	count(COUNTER_UDP);
	if (bpf_get_prandom_u32() < duplicate_below) {
		skb->mark = DUPLICATE_MARK;
		if (bpf_clone_redirect(skb, skb->ifindex, 0) == 0)
			count(COUNTER_DUPLICATED);
		skb->mark = 0;
	}
	if (bpf_get_prandom_u32() < corrupt_below)
		corrupt(skb, udp);
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "Apache-2.0";
