/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Constants shared by the snowflock XDP program (src/mcdist.bpf.c) and its
 * Rust loader (src/abi.rs mirrors them; a unit test parses this file and
 * checks that both agree). Plain `#define NAME VALUE` lines only, so that the
 * test can read them.
 *
 * The mcdist wire format is specified in docs/mcdist.md.
 */
#ifndef SNOWFLOCK_MCDIST_H
#define SNOWFLOCK_MCDIST_H

/* "SFMC" read as a little-endian u32. */
#define MCDIST_MAGIC 0x434d4653
#define MCDIST_VERSION 2
#define MCDIST_KIND_FRAGMENT 1

/* Byte offsets in the UDP payload. */
#define MCDIST_OFFSET_MAGIC 0
#define MCDIST_OFFSET_VERSION 4
#define MCDIST_OFFSET_KIND 5
#define MCDIST_OFFSET_FAMILY 8
#define MCDIST_OFFSET_GENERATION 16
#define MCDIST_OFFSET_PAGE 24
#define MCDIST_FRAGMENT_OFFSET_PAYLOAD 52
#define MCDIST_TAG_LEN 16
/* Common header through kind: enough to tell a FRAGMENT from other kinds. */
#define MCDIST_KIND_END 6
/* Fixed FRAGMENT header, at least one payload byte, and the tag. */
#define MCDIST_FRAGMENT_MIN_LEN 69

/* Indices into the `counters` map. */
#define COUNTER_RECEIVED 0
#define COUNTER_REDIRECTED 1
#define COUNTER_DUPLICATE_DROPPED 2
#define COUNTER_PASSED 3
#define COUNTER_PASSED_NOT_OURS 4
#define COUNTER_MALFORMED 5
#define COUNTER_COUNT 6

/* Map sizes. */
#define PRESENCE_WORDS 262144
#define FAMILIES_MAX 1024
#define XSKS_MAX 64

#endif
