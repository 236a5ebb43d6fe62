// SPDX-License-Identifier: GPL-2.0
/*
 * mermin flow aggregation program (TC / SCHED_CLS, compiled at run time by BCC).
 *
 * One bidirectional entry per flow in the flow table (open addressing over the mmapable
 * arrays `flow_ctl` and `flows`, see "The flow table" below); per direction it keeps
 * packets, IP-layer bytes, the OR of TCP flags and first-packet IP metadata. User space
 * only reads the table (through mmap) and deletes expired entries; it never writes into a
 * live entry, so concurrent increments are never lost.
 *
 * The program is strictly pass-through: every path returns TC_ACT_UNSPEC (== TCX_NEXT),
 * which lets the next program in the chain decide. It never drops, redirects or writes
 * packet data.
 *
 * Compile-time parameters (set by the loader with -D):
 *   MAX_FLOWS        capacity of the flow table (entries)
 *   FLOW_SLOTS       its home slots (compiler.flow_slots: twice MAX_FLOWS)
 *   FLOW_PROBES      slots a key may lie in from its home slot (compiler.FLOW_PROBES)
 *   OFFLINE_CLOCK    pcap input: times come from the `offline` map (see mermin_pcap)
 *   EVENT_SLOTS      new-flow events each CPU's ring holds (a power of two)
 *   EVENT_CPUS       possible CPUs (the highest CPU number + 1)
 */
/* Only self-contained uapi headers: BCC compiles this file on every start, and e.g.
 * <uapi/linux/in.h> drags in the kernel's linux/socket.h tree (0.8 s of compile). */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/pkt_cls.h>

#ifndef MAX_FLOWS
#define MAX_FLOWS 16384
#endif

#define ETH_P_8021Q_BE   0x0081 /* htons(0x8100) */
#define ETH_P_8021AD_BE  0xA888 /* htons(0x88A8) */
#define ETH_P_IP_BE      0x0008 /* htons(0x0800) */
#define ETH_P_IPV6_BE    0xDD86 /* htons(0x86DD) */

#define PROTO_ICMP   1
#define PROTO_TCP    6
#define PROTO_UDP    17
#define PROTO_ICMPV6 58
#define PROTO_SCTP   132
#define PROTO_UDPLITE 136

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

/* Headers we may need to read: 14 (eth) + 8 (two VLAN tags) + 40 (IPv6) + 4 x 64
 * (extension headers, bounded) is beyond any sane linear area, so pull at most this
 * many bytes into the linear area when a packet arrives non-linear. */
#define PULL_LEN 128
#define MAX_VLAN_TAGS 2
#define MAX_IPV6_EXT 4

#define DIR_NONE 0xff

/* first_ns/last_ns are in ticks of table_time(): jiffies in live capture. Reading
 * jiffies is one load, where even the coarse monotonic clock costs a seqcount loop and
 * two calls: the clock was the largest cost of the hit path after the table lookup.
 * Jiffy resolution (1-10 ms) is plenty for seconds-scale timeouts. User space converts
 * ticks to CLOCK_MONOTONIC ns with the tick length and one edge it observes through
 * mermin_clock() (mermin_cli/engine/clock.py). The handshake times feed an RTT and use
 * the precise clock (ns). */
#if defined(OFFLINE_CLOCK)
/* Offline input (pcap records through BPF_PROG_TEST_RUN, see mermin_pcap): the time of
 * the record being run (ns), so every time is the recording's, and the batch's settings
 * and results. One mmapable value: user space reads and writes it without a syscall. */
struct offline_state {
    __u64 now;      /* time of the record being run (ns) */
    __u64 frac_ns;  /* in: ns per unit of a record's second fraction (1000 or 1) */
    __u64 window;   /* in: the largest window a test run takes */
    __u64 deadline; /* in: stop before a record this late (ns) */
    __u64 stop_ts;  /* out: the time of that record (BATCH_DEADLINE) */
    __u64 consumed; /* out: bytes of the window consumed */
    __u64 records;  /* out: records run */
    __u64 why;      /* out: BATCH_* */
};
BPF_F_TABLE("array", __u32, struct offline_state, offline, 1, BPF_F_MMAPABLE);
static __always_inline __u64 offline_now(void)
{
    __u32 zero = 0;
    struct offline_state *st = offline.lookup(&zero);
    return st ? st->now : 0;
}
#define table_time() offline_now()
#define precise_ns() offline_now()
#else
#define table_time() bpf_jiffies64()
#define precise_ns() bpf_ktime_get_ns()

/* Run by user space through BPF_PROG_TEST_RUN to read the current jiffies. */
BPF_ARRAY(clock_sync, __u64, 1);
int mermin_clock(struct __sk_buff *skb)
{
    __u32 zero = 0;
    __u64 *j = clock_sync.lookup(&zero);
    if (j)
        *j = bpf_jiffies64();
    return TC_ACT_UNSPEC;
}
#endif

/* pkt.no_l4: why the transport header was not parsed */
#define NO_L4_FRAGMENT 1  /* non-first IP fragment */
#define NO_L4_EXT_LIMIT 2 /* more IPv6 extension headers than MAX_IPV6_EXT */

/* Flow key: 44 bytes, no implicit padding (the hash covers raw bytes). Addresses are
 * ordered so both directions of a flow share one key; `dir` 0 means the packet goes
 * lo -> hi, 1 means hi -> lo. IPv4 is stored in the first word, the rest zero. */
struct flow_key {
    __u32 lo_addr[4];
    __u32 hi_addr[4];
    __u16 lo_port;   /* host order; ICMP: see icmp_key_ports() */
    __u16 hi_port;
    __u32 ifindex;   /* interface the packet was seen on: no double counting */
    __u8  proto;
    __u8  ip_ver;    /* 4 or 6 */
    __u16 pad;       /* always 0 */
};

/* Flow value: 96 bytes, padding explicit. The first 56 bytes are touched by every packet. */
struct flow_stats {
    __u64 packets[2];    /* [dir] */
    __u64 bytes[2];      /* [dir] IP-layer bytes (IP header + payload) */
    __u64 first_ns;      /* table_time() of the first packet */
    __u64 last_ns;       /* table_time() of the latest packet */
    __u8  tcp_flags[2];  /* [dir] OR of all TCP flags seen */
    __u8  first_dir;     /* direction of the first packet */
    __u8  first_hook;    /* 0 ingress, 1 egress (hook of the first packet) */
    __u8  syn_dir;       /* direction of the first pure SYN, DIR_NONE if none */
    __u8  synack_dir;    /* direction of the first SYN+ACK, DIR_NONE if none */
    __u8  meta_seen;     /* bit per direction: first-packet metadata captured */
    __u8  flags;         /* FLOW_F_* */
    /* first packet of each direction */
    __u8  ttl[2];
    __u8  tos[2];        /* DSCP << 2 | ECN */
    __u8  icmp_type[2];
    __u8  icmp_code[2];
    __u32 flow_label[2]; /* IPv6 only */
    __u16 vlan_id;       /* outer VLAN id of the first packet, 0 if untagged */
    __u8  mac[6];        /* source MAC of the first packet (L2 devices) */
    __u64 syn_ns;        /* first pure SYN */
    __u64 synack_ns;     /* first SYN+ACK */
};

#define FLOW_F_FRAGMENT 0x01 /* non-first IP fragments: no ports available */

/* Per-CPU counters; indices mirror mermin_cli/engine/layout.py COUNTERS. */
enum {
    CTR_PACKETS = 0,     /* packets seen by the program */
    CTR_NON_IP,          /* not IPv4/IPv6 (ARP, LLDP, ...) */
    CTR_TRUNCATED,       /* headers shorter than they claim */
    CTR_FRAGMENT,        /* non-first IP fragments (tracked without ports) */
    CTR_IPV6_EXT_LIMIT,  /* more IPv6 extension headers than we walk */
    CTR_NEW_FLOWS,       /* entries created */
    CTR_INSERT_RACE,     /* another CPU created the entry first */
    CTR_MAP_FULL,        /* no entry could be created: packet not in any flow */
    CTR_MAP_FULL_BYTES,  /* IP bytes of those packets */
    CTR_FILTERED_FLOWS,  /* flows rejected by the filters (never entered `flows`) */
    CTR_FILTERED_PKTS,   /* packets of those flows */
    CTR_EVENTS_DROPPED,  /* new-flow events lost: ring buffer full */
    CTR_CACHE_LOST,      /* cached packets whose flow was gone at a flush (a bug if not 0) */
    CTR_MAX,
};

/*
 * The flow table: open addressing with linear probing in mmapable arrays, instead of a
 * BPF hash map. In bench/kernel_cost.py a hash map's insert (a helper call, a bucket
 * lock with interrupts off, a per-CPU free list) and its miss (jhash, the bucket walk)
 * were most of a new flow's cost; here a miss reads a cache line or two of control
 * words and an insert claims a slot with a compare-and-swap. User space reads the table
 * through mmap.
 *
 * Each slot has a control word in `flow_ctl`, hash << 32 | state, eight to a cache line:
 * a probe compares one word, and only a word equal to the key's hash and FULL sends it
 * to the slot's key in `flows`. User space finds the full slots by scanning the words,
 * not the 192-byte slots (a table of 2^20 slots is 8 MiB of words, 192 MiB of slots).
 *
 * A key lives in one of the FLOW_PROBES slots from its home slot on (the arrays have
 * FLOW_PROBES slots past FLOW_SLOTS, so probing never wraps). With 16, a table 38 % full
 * (400,000 flows in 2^20 slots, bench/flowrate.py) had 8 flows find every slot of their
 * sequence taken; in a simulation with this hash, 48 left 1 of 524,288 flows out of a
 * full table, 64 none (eight lines of control words at most; a miss reads until the
 * first EMPTY word, 2.5 words on average with the table full). A slot's state goes:
 *   EMPTY or DELETED -> CLAIMED   kernel, compare-and-swap (one claimer wins)
 *   CLAIMED -> FULL               kernel, after writing key and stats
 *   FULL -> DELETED               user space (engine/table.py), after reading the stats
 *   DELETED -> EMPTY              mermin_table_sweep, compare-and-swap, when the next
 *                                 slot is EMPTY (no probe sequence then passes it)
 * A lookup stops at the first EMPTY slot and passes DELETED ones. Two CPUs may, in rare
 * races (a claim beside a sweep, a first packet on two CPUs at once), put one key in
 * two slots: user space merges such duplicates when it reads, so no count is lost.
 * Plain stores publish a FULL slot: ordered on x86 (TSO); a weakly ordered CPU could
 * see FULL before the key, miss, and add a duplicate (merged the same way).
 */
#ifndef FLOW_SLOTS
#define FLOW_SLOTS (2 * MAX_FLOWS)
#endif
#ifndef FLOW_PROBES
#define FLOW_PROBES 64
#endif

/* The low bits of a control word. Odd states are taken: a claim looks for an even one.
 * EMPTY is the whole word 0; DELETED keeps the hash. */
enum { SLOT_EMPTY = 0, SLOT_FULL = 1, SLOT_DELETED = 2, SLOT_CLAIMED = 3 };
#define SLOT_STATE 3
#define SLOT_BUSY 1
#define NO_SLOT 0xffffffff

struct flow_slot {
    struct flow_key key;
    __u32 pad0;
    __u64 pad1[2];
    struct flow_stats stats; /* a cache line of its own for the hot counters */
    __u64 pad2[4];           /* 192 bytes: slots never share a line */
};
/* u64 words: BCC has no 32-bit compare-and-swap */
BPF_F_TABLE("array", __u32, __u64, flow_ctl, FLOW_SLOTS + FLOW_PROBES, BPF_F_MMAPABLE);
BPF_F_TABLE("array", __u32, struct flow_slot, flows, FLOW_SLOTS + FLOW_PROBES,
            BPF_F_MMAPABLE);

/* Entries in use: [0] counts claims (kernel), [1] deletes (user space). A line each. */
struct table_use {
    __u64 n;
    __u64 pad[7];
};
BPF_F_TABLE("array", __u32, struct table_use, flow_use, 2, BPF_F_MMAPABLE);
BPF_PERCPU_ARRAY(counters, __u64, CTR_MAX);

#ifndef EVENT_SLOTS
#define EVENT_SLOTS 1024 /* per CPU, a power of two (compiler.event_slots) */
#endif
#ifndef EVENT_CPUS
#define EVENT_CPUS 1     /* possible CPUs: the highest CPU number + 1 */
#endif
/* One event per new flow (never per packet): lets user space see a flow as soon as it
 * starts instead of at the next table poll. The table stays the source of truth, so a
 * lost event costs latency, not data.
 *
 * Each CPU has its own ring of EVENT_SLOTS events in one mmapable array, read by
 * engine/events.py through mmap. A BPF ring buffer (bpf_ringbuf_output) took 0.17-0.23
 * of a new flow's cost in bench/kernel_cost.py (helper calls, a spin lock with interrupts
 * off, a locked commit): a CPU-local ring needs none of them. The kernel alone writes
 * `event_heads` and the slots, user space alone writes `event_tails`, so no line is
 * written from both sides. A full ring drops the event and counts it, as before. */
struct flow_event {
    struct flow_key key;
    __u32 ip_len;       /* IP bytes of the first packet */
    __u64 ts;           /* table_time() of the first packet */
    /* The entry's fields user space needs to adopt the flow (orientation, Community ID),
     * as the first packet set them: adopting then costs no table lookup. */
    __u8  first_dir;
    __u8  syn_dir;
    __u8  synack_dir;
    __u8  icmp_type;    /* of the first packet's direction */
    __u8  icmp_code;
    __u8  pad[3];       /* 64 bytes: one cache line per event */
};
struct event_pos {
    __u64 pos;      /* events written (heads) or read (tails) on this CPU, ever */
    __u64 pad[7];   /* a cache line each: heads and tails never share one */
};
BPF_F_TABLE("array", __u32, struct flow_event, event_slots, EVENT_SLOTS * EVENT_CPUS,
            BPF_F_MMAPABLE);
BPF_F_TABLE("array", __u32, struct event_pos, event_heads, EVENT_CPUS, BPF_F_MMAPABLE);
BPF_F_TABLE("array", __u32, struct event_pos, event_tails, EVENT_CPUS, BPF_F_MMAPABLE);

/*
 * Flow filters on the initiator's (source) and responder's (destination) address and
 * port, the transport and the IP version. They run only when a packet misses the flow
 * table, so established flows pay nothing; a rejected flow is remembered in the
 * `filtered` LRU so its later packets cost one lookup and never fill `flows`.
 * mermin_cli/flows/filters.py fills these maps from the config.
 */
#define F_SRC_ADDR_MATCH 0x001
#define F_SRC_ADDR_NOT   0x002
#define F_DST_ADDR_MATCH 0x004
#define F_DST_ADDR_NOT   0x008
#define F_SRC_PORT_MATCH 0x010
#define F_SRC_PORT_NOT   0x020
#define F_DST_PORT_MATCH 0x040
#define F_DST_PORT_NOT   0x080
#define F_PROTO          0x100 /* filter_protos[proto] says whether it is allowed */
#define F_REJECT_V4      0x200
#define F_REJECT_V6      0x400

/* filter_ports[port] bits */
#define PORT_SRC_MATCH 0x1
#define PORT_SRC_NOT   0x2
#define PORT_DST_MATCH 0x4
#define PORT_DST_NOT   0x8

/* Address lists share one LPM trie: data[0] is the list, data[1..16] the address
 * (IPv4 as ::ffff:a.b.c.d), data[17..19] zero. */
enum { LIST_SRC_MATCH = 0, LIST_SRC_NOT, LIST_DST_MATCH, LIST_DST_NOT };
struct addr_lpm {
    __u32 prefixlen;
    __u8  data[20];
};

struct filter_cfg {
    __u32 active; /* F_* bits; 0 = no filters */
};

BPF_LPM_TRIE(filter_addrs, struct addr_lpm, __u8, 4096);
BPF_ARRAY(filter_ports, __u8, 65536);
BPF_ARRAY(filter_protos, __u8, 256);
BPF_ARRAY(filter_cfg, struct filter_cfg, 1);
BPF_TABLE("lru_hash", struct flow_key, __u8, filtered, MAX_FLOWS);

/* What the parser extracts from one packet. */
struct pkt {
    struct flow_key key;  /* not yet ordered: lo = source, hi = destination */
    __u32 ip_len;
    __u32 flow_label;
    __u16 vlan_id;
    __u8  tcp_flags;
    __u8  ttl;
    __u8  tos;
    __u8  icmp_type;
    __u8  icmp_code;
    __u8  no_l4;          /* NO_L4_*, 0 when the transport header was parsed */
    __u8  mac[6];         /* source MAC, filled on the miss path only */
} __attribute__((aligned(8))); /* the key is compared in 8-byte words (flow_cache) */

/* Where a packet is parsed to: a per-CPU value rather than the stack. The verifier tracks
 * every constant a parse path leaves on the stack, so the paths stayed apart through the
 * flow table's probe loops and each walked them (149,000 instructions verified for the
 * Ethernet entry point: start-up 2.3 s instead of 1.8 s); values in a map are unknown to
 * it, so the paths merge (34,000). It costs the hit path 1.5-4 %. A TC program runs
 * with bottom halves off (softirq, or rcu_read_lock_bh() around egress; on PREEMPT_RT a
 * per-CPU lock): one CPU never runs two at once, so one value per CPU is enough. */
BPF_PERCPU_ARRAY(pkt_scratch, struct pkt, 1);

static __always_inline struct pkt *new_pkt(void)
{
    __u32 zero = 0;
    struct pkt *p = pkt_scratch.lookup(&zero);
    if (p)
        __builtin_memset(p, 0, sizeof(*p));
    return p;
}

static __always_inline void count(__u32 idx, __u64 n)
{
    __u64 *v = counters.lookup(&idx);
    if (v)
        *v += n; /* per-CPU slot: no atomics needed */
}

/* ICMP key ports. Echo request/reply use the identifier in both slots so both
 * directions meet and separate ping sessions stay separate; other types use the
 * request type of a request/reply pair (or the type itself) and the code, so
 * different error kinds between two hosts stay distinct. */
static __always_inline void icmp_key_ports(struct pkt *p, __u8 v6, __u16 echo_id)
{
    __u8 t = p->icmp_type;
    __u8 is_echo = v6 ? (t == 128 || t == 129) : (t == 8 || t == 0);
    if (is_echo) {
        p->key.lo_port = echo_id;
        p->key.hi_port = echo_id;
        return;
    }
    if (!v6) {
        if (t == 14 || t == 16 || t == 18)
            t -= 1; /* timestamp/info/mask reply -> request */
    } else if (t == 131 || t == 134 || t == 136 || t == 140 || t == 145) {
        t -= 1;     /* MLD/ND/NI/HA replies -> request */
    }
    p->key.lo_port = t;
    p->key.hi_port = p->icmp_code;
}

/*
 * Header bounds. `data_end` is the end of the skb's data, the bound the verifier knows;
 * `limit` is where this frame's bytes stop. Live they are the same pointer and the
 * compiler folds the two tests into one; pcap records arrive several to a test run
 * (mermin_pcap), and a record cut short by its snaplen must not read into the next one.
 */
#define CUT(ptr, n) ((void *)(ptr) + (n) > data_end || (void *)(ptr) + (n) > limit)

/* Layer 4: ports, TCP flags, ICMP type/code. Returns 0, or -1 if truncated. */
static __always_inline int parse_l4(struct pkt *p, void *l4, void *data_end, void *limit,
                                    __u8 v6)
{
    __u8 proto = p->key.proto;

    if (p->no_l4)
        return 0; /* no transport header here */

    if (proto == PROTO_TCP) {
        if (CUT(l4, 14))
            return -1;
        __u16 *ports = l4;
        p->key.lo_port = bpf_ntohs(ports[0]);
        p->key.hi_port = bpf_ntohs(ports[1]);
        p->tcp_flags = *(__u8 *)(l4 + 13);
    } else if (proto == PROTO_UDP || proto == PROTO_SCTP || proto == PROTO_UDPLITE) {
        if (CUT(l4, 4))
            return -1;
        __u16 *ports = l4;
        p->key.lo_port = bpf_ntohs(ports[0]);
        p->key.hi_port = bpf_ntohs(ports[1]);
    } else if (proto == PROTO_ICMP || proto == PROTO_ICMPV6) {
        if (CUT(l4, 8))
            return -1;
        __u8 *icmp = l4;
        p->icmp_type = icmp[0];
        p->icmp_code = icmp[1];
        icmp_key_ports(p, v6, bpf_ntohs(*(__u16 *)(l4 + 4)));
    }
    /* any other protocol: no ports */
    return 0;
}

static __always_inline int parse_ipv4(struct pkt *p, void *l3, void *data_end, void *limit,
                                      __u32 l3_len)
{
    struct iphdr *ip = l3;
    if (CUT(ip, sizeof(*ip)))
        return -1;
    __u32 ihl = ip->ihl * 4;
    if (ihl < sizeof(*ip))
        return -1;

    p->key.ip_ver = 4;
    p->key.proto = ip->protocol;
    p->key.lo_addr[0] = ip->saddr;
    p->key.hi_addr[0] = ip->daddr;
    p->ttl = ip->ttl;
    p->tos = ip->tos;

    /* The length field excludes Ethernet padding; 0 (TSO/BIG TCP) falls back. */
    __u32 tot = bpf_ntohs(ip->tot_len);
    p->ip_len = (tot && tot <= l3_len) ? tot : l3_len;

    if (bpf_ntohs(ip->frag_off) & 0x1fff) {
        p->no_l4 = NO_L4_FRAGMENT;
        return 0;
    }
    void *l4 = l3 + ihl;
    if (CUT(l4, 0))
        return -1;
    return parse_l4(p, l4, data_end, limit, 0);
}

/* IPv6 extension headers that may precede the transport header. */
static __always_inline int is_ipv6_ext(__u8 nh)
{
    return nh == 0 /* hop-by-hop */ || nh == 43 /* routing */ || nh == 44 /* fragment */ ||
           nh == 60 /* destination options */ || nh == 51 /* AH */;
}

static __always_inline int parse_ipv6(struct pkt *p, void *l3, void *data_end, void *limit,
                                      __u32 l3_len)
{
    struct ipv6hdr *ip6 = l3;
    if (CUT(ip6, sizeof(*ip6)))
        return -1;

    p->key.ip_ver = 6;
    __builtin_memcpy(p->key.lo_addr, &ip6->saddr, 16);
    __builtin_memcpy(p->key.hi_addr, &ip6->daddr, 16);
    p->ttl = ip6->hop_limit;
    __u32 w0 = bpf_ntohl(*(__u32 *)ip6);
    p->tos = (w0 >> 20) & 0xff;
    p->flow_label = w0 & 0xfffff;

    __u32 payload = bpf_ntohs(ip6->payload_len);
    __u32 tot = payload + sizeof(*ip6);
    p->ip_len = (payload && tot <= l3_len) ? tot : l3_len;

    __u8 nh = ip6->nexthdr;
    void *hdr = (void *)(ip6 + 1);

    /* Walk a bounded number of extension headers (verifier-friendly unrolled loop). */
#pragma unroll
    for (int i = 0; i < MAX_IPV6_EXT; i++) {
        if (!is_ipv6_ext(nh))
            break;
        __u8 *ext = hdr;
        if (CUT(ext, 8))
            return -1;
        __u32 len;
        if (nh == 44) {
            /* fragment header: offset in the upper 13 bits of bytes 2-3 */
            if (bpf_ntohs(*(__u16 *)(ext + 2)) & 0xfff8)
                p->no_l4 = NO_L4_FRAGMENT;
            len = 8;
        } else if (nh == 51) {
            len = ((__u32)ext[1] + 2) * 4;
        } else {
            len = ((__u32)ext[1] + 1) * 8;
        }
        nh = ext[0];
        hdr += len;
        if (p->no_l4)
            break; /* non-first fragment: what follows is payload, not headers */
    }
    if (!p->no_l4 && is_ipv6_ext(nh))
        p->no_l4 = NO_L4_EXT_LIMIT; /* transport header not reached: track without ports */
    p->key.proto = nh;
    if (CUT(hdr, 0))
        return -1;
    return parse_l4(p, hdr, data_end, limit, 1);
}

/* Order the endpoints so both directions share a key; returns the packet direction. */
static __always_inline __u8 normalize(struct flow_key *k)
{
    __u8 swap = 0;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        if (k->lo_addr[i] != k->hi_addr[i]) {
            swap = k->lo_addr[i] > k->hi_addr[i];
            goto decided;
        }
    }
    /* same address on both ends (loopback): order by port, ICMP keeps its slots */
    if (k->proto != PROTO_ICMP && k->proto != PROTO_ICMPV6)
        swap = k->lo_port > k->hi_port;
decided:
    if (!swap)
        return 0;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        __u32 t = k->lo_addr[i];
        k->lo_addr[i] = k->hi_addr[i];
        k->hi_addr[i] = t;
    }
    if (k->proto != PROTO_ICMP && k->proto != PROTO_ICMPV6) {
        __u16 t = k->lo_port;
        k->lo_port = k->hi_port;
        k->hi_port = t;
    }
    return 1;
}

/* Metadata of the first packet in a direction (written once per direction). */
static __always_inline void set_meta(struct flow_stats *s, struct pkt *p, __u8 dir)
{
    if (dir) {
        s->ttl[1] = p->ttl;
        s->tos[1] = p->tos;
        s->icmp_type[1] = p->icmp_type;
        s->icmp_code[1] = p->icmp_code;
        s->flow_label[1] = p->flow_label;
    } else {
        s->ttl[0] = p->ttl;
        s->tos[0] = p->tos;
        s->icmp_type[0] = p->icmp_type;
        s->icmp_code[0] = p->icmp_code;
        s->flow_label[0] = p->flow_label;
    }
    s->meta_seen |= 1 << dir;
}

/* TCP handshake bookkeeping: who sent the first SYN / SYN+ACK, and when. */
static __always_inline void note_handshake(struct flow_stats *s, __u8 flags, __u8 dir)
{
    __u8 syn_ack = flags & (TCP_SYN | TCP_ACK);
    if (syn_ack == TCP_SYN && s->syn_dir == DIR_NONE) {
        s->syn_dir = dir;
        s->syn_ns = precise_ns();
    } else if (syn_ack == (TCP_SYN | TCP_ACK) && s->synack_dir == DIR_NONE) {
        s->synack_dir = dir;
        s->synack_ns = precise_ns();
    }
}

static __always_inline void update(struct flow_stats *s, struct pkt *p, __u8 dir, __u64 now)
{
    /* Explicit branches per direction: a computed index into the value makes clang
     * emit pointer arithmetic that older verifiers reject. */
    if (dir) {
        __sync_fetch_and_add(&s->packets[1], 1);
        __sync_fetch_and_add(&s->bytes[1], p->ip_len);
        if ((s->tcp_flags[1] | p->tcp_flags) != s->tcp_flags[1])
            s->tcp_flags[1] |= p->tcp_flags; /* benign race: flags only accumulate */
    } else {
        __sync_fetch_and_add(&s->packets[0], 1);
        __sync_fetch_and_add(&s->bytes[0], p->ip_len);
        if ((s->tcp_flags[0] | p->tcp_flags) != s->tcp_flags[0])
            s->tcp_flags[0] |= p->tcp_flags;
    }
    s->last_ns = now;
    if (!(s->meta_seen & (1 << dir)))
        set_meta(s, p, dir);
    if (p->tcp_flags & TCP_SYN)
        note_handshake(s, p->tcp_flags, dir);
}

/* Without a branch per word: each branch is another path for the verifier to walk. */
static __always_inline int key_equal(const __u64 *a, const __u64 *b)
{
    __u64 diff = (a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) |
                 (a[4] ^ b[4]) | (*(const __u32 *)&a[5] ^ *(const __u32 *)&b[5]);
    return diff == 0;
}

/* Multiply-xor over the key's 11 words, 64 bits wide (engine/table.py computes the
 * same): the high half picks the home slot, all but the two state bits are the slot's
 * tag in its control word. */
static __always_inline __u64 flow_hash(const struct flow_key *k)
{
    const __u32 *w = (const __u32 *)k;
    __u64 h = 0x9e3779b97f4a7c15ULL;
#pragma unroll
    for (int i = 0; i < sizeof(*k) / 4; i++) {
        h ^= w[i];
        h *= 0xbf58476d1ce4e5b9ULL;
        h ^= h >> 29;
    }
    return h;
}

/* The key's home slot: the hash's high half scaled to FLOW_SLOTS (no division). */
static __always_inline __u32 home_slot(__u64 h)
{
    return ((h >> 32) * FLOW_SLOTS) >> 32;
}

/* The control word of a FULL slot of this hash. */
static __always_inline __u64 full_word(__u64 h)
{
    return (h & ~(__u64)SLOT_STATE) | SLOT_FULL;
}

/* Slot `idx`, if its key is `k`. */
static __always_inline struct flow_slot *slot_of(__u32 idx, const struct flow_key *k)
{
    struct flow_slot *s = flows.lookup(&idx);
    return s && key_equal((const __u64 *)&s->key, (const __u64 *)k) ? s : NULL;
}

/*
 * The probe loops compare control words only, and the key once after: the verifier walks
 * every pass of a loop for every path that reaches it, and a key compare in each pass
 * made the Ethernet entry point verify three times the instructions (start-up +0.4 s).
 * So the first slot whose word matches is taken as the key's: with 62 bits of tag, two
 * keys of one probe sequence share a tag with odds of about 10^-17 per packet, and then
 * the packet is counted as not accounted (CTR_MAP_FULL) rather than added to the wrong
 * flow. Not unrolled: clang took 0.5 s longer to compile the unrolled copies.
 */

/* The first slot of the key's probe sequence whose word is the key's FULL word, or with
 * `claim` (a constant) the first free (EMPTY or DELETED) one before it, claimed with a
 * compare-and-swap (`*created` 1; a claim lost to another CPU goes on to the next slot).
 * NO_SLOT if there is neither. */
static __always_inline __u32 flow_probe(__u64 h, const int claim, int *created)
{
    __u32 home = home_slot(h);
    __u64 want = full_word(h);
    *created = 0;
#pragma clang loop unroll(disable)
    for (__u32 i = 0; i < FLOW_PROBES; i++) {
        __u32 idx = home + i;
        __u64 *ctl = flow_ctl.lookup(&idx);
        if (!ctl)
            break;
        __u64 word = *ctl;
        if (word == want)
            return idx;
        if (!claim) {
            if (word == SLOT_EMPTY)
                break; /* no probe sequence goes on past an EMPTY slot */
            continue;
        }
        if (!(word & SLOT_BUSY) &&
            __sync_val_compare_and_swap(ctl, word, want | SLOT_CLAIMED) == word) {
            *created = 1;
            return idx;
        }
    }
    return NO_SLOT;
}

/* The key's slot (its index in `*at`), or NULL. */
static __always_inline struct flow_slot *flow_find(const struct flow_key *k, __u64 h,
                                                   __u32 *at)
{
    int created;
    __u32 idx = flow_probe(h, 0, &created);
    if (idx == NO_SLOT)
        return NULL;
    *at = idx;
    return slot_of(idx, k);
}

/* The slot for a new entry: the key's, if another CPU has just created it (`*created`
 * 0), else a free one, claimed, with the key written (`*created` 1: the caller fills the
 * stats, then publishes it); NULL if there is none. `*at`: the slot's index. */
static __always_inline struct flow_slot *flow_claim(const struct flow_key *k, __u64 h,
                                                    __u32 *at, int *created)
{
    __u32 idx = flow_probe(h, 1, created);
    if (idx == NO_SLOT)
        return NULL;
    *at = idx;
    if (!*created)
        return slot_of(idx, k);
    struct flow_slot *s = flows.lookup(&idx);
    if (s)
        __builtin_memcpy(&s->key, k, sizeof(*k));
    return s; /* NULL cannot happen: both arrays have the same size */
}

/* Make a claimed slot FULL, after its key and stats are written (see the table's
 * comment), and count the claim. */
static __always_inline void flow_publish(__u32 idx, __u64 h)
{
    __u64 *ctl = flow_ctl.lookup(&idx);
    if (ctl)
        *ctl = full_word(h);
    __u32 claims = 0;
    struct table_use *use = flow_use.lookup(&claims);
    if (use)
        __sync_fetch_and_add(&use->n, 1);
}

/* Entries in use, claims minus user space's deletes. */
static __always_inline __u64 flows_in_use(void)
{
    __u32 claims = 0, deletes = 1;
    struct table_use *c = flow_use.lookup(&claims);
    struct table_use *d = flow_use.lookup(&deletes);
    return c && d ? c->n - d->n : MAX_FLOWS;
}

/* Turn the DELETED slots before EMPTY ones back into EMPTY, so that lookups stop early
 * again. Run by user space (engine/table.py) through BPF_PROG_TEST_RUN, with the indices
 * of EMPTY slots that follow a DELETED one (or of the end of the array) as u32s after a
 * 14-byte frame header; from each it walks back while the slot after is EMPTY. A
 * compare-and-swap, as a CPU may claim the same DELETED slot meanwhile. It checks every
 * step itself, so a stale or wrong index never breaks a probe sequence. Returns how many
 * slots it emptied. */
#define SWEEP_MAX 16  /* indices per run: the verifier walks every pass */
#define SWEEP_WALK 16 /* slots walked back from each; a longer run waits for the next sweep */
int mermin_table_sweep(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    int swept = 0;
    for (__u32 i = 0; i < SWEEP_MAX; i++) {
        __u32 *at = data + sizeof(struct ethhdr) + i * sizeof(__u32);
        if ((void *)(at + 1) > data_end)
            break;
        __u32 next = *at;
        for (__u32 step = 0; step < SWEEP_WALK; step++) {
            __u32 idx = next - 1;
            __u64 *after = flow_ctl.lookup(&next); /* past the end: as if EMPTY */
            __u64 *ctl = flow_ctl.lookup(&idx);    /* none before slot 0 */
            if (!ctl || (after ? *after != SLOT_EMPTY : next != FLOW_SLOTS + FLOW_PROBES))
                break;
            __u64 word = *ctl;
            if ((word & SLOT_STATE) != SLOT_DELETED ||
                __sync_val_compare_and_swap(ctl, word, SLOT_EMPTY) != word)
                break;
            swept++;
            next = idx;
        }
    }
    return swept;
}

/* Append a new-flow event to this CPU's ring; 0 when it is full. A TC program runs to its
 * end on one CPU (softirq, no migration), so the CPU's ring has one writer at a time.
 * (PREEMPT_RT can interleave two: an event may then be lost or repeated, and a head that
 * went back is mended by the next read, which sets the tail to it: hints either way.) */
static __always_inline int emit_event(struct pkt *p, const struct flow_stats *first)
{
    __u32 cpu = bpf_get_smp_processor_id();
    struct event_pos *head = event_heads.lookup(&cpu);
    struct event_pos *tail = event_tails.lookup(&cpu);
    if (!head || !tail)
        return 0;
    __u64 pos = head->pos;
    if (pos - tail->pos >= EVENT_SLOTS)
        return 0;
    __u32 idx = cpu * EVENT_SLOTS + (__u32)(pos & (EVENT_SLOTS - 1));
    struct flow_event *ev = event_slots.lookup(&idx);
    if (!ev)
        return 0;
    ev->key = p->key;
    ev->ip_len = p->ip_len;
    ev->ts = first->first_ns;
    ev->first_dir = first->first_dir;
    ev->syn_dir = first->syn_dir;
    ev->synack_dir = first->synack_dir;
    ev->icmp_type = p->icmp_type;
    ev->icmp_code = p->icmp_code;
    /* Plain stores, no lock: on x86 (TSO) the slot is visible before the new head. A
     * weakly ordered CPU could show the head first, and the reader would take the slot's
     * previous event: an event is a hint (the table holds the counts), so at worst a
     * flow is adopted late or a closed one is remembered, never a count changed. */
    head->pos = pos + 1;
    return 1;
}

/* A new entry for the packet's flow (`h`: its key's hash). */
static __always_inline void create(struct pkt *p, __u8 dir, __u8 hook, __u64 now, __u64 h)
{
    __u32 at = 0;
    int created = 0;
    struct flow_slot *s = flows_in_use() < MAX_FLOWS ? flow_claim(&p->key, h, &at, &created)
                                                     : NULL;
    if (!s) {
        count(CTR_MAP_FULL, 1);
        count(CTR_MAP_FULL_BYTES, p->ip_len);
        return;
    }
    if (!created) {
        count(CTR_INSERT_RACE, 1);
        update(&s->stats, p, dir, now);
        return;
    }
    /* Claimed, not yet visible to any other CPU: plain stores. */
    struct flow_stats *init = &s->stats;
    __builtin_memset(init, 0, sizeof(*init));
    init->first_ns = now;
    init->first_dir = dir;
    init->first_hook = hook;
    init->syn_dir = DIR_NONE;
    init->synack_dir = DIR_NONE;
    init->last_ns = now;
    init->vlan_id = p->vlan_id;
    __builtin_memcpy(init->mac, p->mac, 6);
    init->flags = p->no_l4 == NO_L4_FRAGMENT ? FLOW_F_FRAGMENT : 0;
    if (dir) {
        init->packets[1] = 1;
        init->bytes[1] = p->ip_len;
        init->tcp_flags[1] = p->tcp_flags;
    } else {
        init->packets[0] = 1;
        init->bytes[0] = p->ip_len;
        init->tcp_flags[0] = p->tcp_flags;
    }
    set_meta(init, p, dir);
    if (p->tcp_flags & TCP_SYN)
        note_handshake(init, p->tcp_flags, dir);
    flow_publish(at, h);
    count(CTR_NEW_FLOWS, 1);
    if (!emit_event(p, init))
        count(CTR_EVENTS_DROPPED, 1);
}

/* Does this first packet answer an earlier one (so its receiver initiated the flow)? */
static __always_inline int answers(struct pkt *p)
{
    __u8 proto = p->key.proto, t = p->icmp_type;
    if (proto == PROTO_TCP)
        return (p->tcp_flags & (TCP_SYN | TCP_ACK)) == (TCP_SYN | TCP_ACK);
    if (proto == PROTO_ICMP)
        return t == 0 || t == 14 || t == 16 || t == 18;
    if (proto == PROTO_ICMPV6)
        return t == 129 || t == 131 || t == 134 || t == 136 || t == 140;
    return 0;
}

static __always_inline int addr_listed(__u8 list, const __u32 *addr, __u8 ip_ver)
{
    struct addr_lpm k = {};
    k.prefixlen = 8 + 128;
    k.data[0] = list;
    if (ip_ver == 4) {
        k.data[11] = 0xff;
        k.data[12] = 0xff;
        __builtin_memcpy(&k.data[13], addr, 4);
    } else {
        __builtin_memcpy(&k.data[1], addr, 16);
    }
    return filter_addrs.lookup(&k) != NULL;
}

/* match/not_match semantics: rejected if on the not list, or if a match list exists
 * and the value is not on it. */
static __always_inline int addr_rejected(__u32 active, __u32 match_bit, __u32 not_bit,
                                         __u8 match_list, const __u32 *addr, __u8 ip_ver)
{
    if ((active & not_bit) && addr_listed(match_list + 1, addr, ip_ver))
        return 1;
    return (active & match_bit) && !addr_listed(match_list, addr, ip_ver);
}

static __always_inline int port_rejected(__u32 active, __u32 match_bit, __u32 not_bit,
                                         __u8 bit_match, __u32 port)
{
    if (!(active & (match_bit | not_bit)))
        return 0;
    __u8 *bits = filter_ports.lookup(&port);
    __u8 b = bits ? *bits : 0;
    if ((active & not_bit) && (b & (bit_match << 1)))
        return 1;
    return (active & match_bit) && !(b & bit_match);
}

static __always_inline int rejected(struct pkt *p, __u8 dir, __u32 active)
{
    struct flow_key *k = &p->key;
    if (k->ip_ver == 4 ? (active & F_REJECT_V4) : (active & F_REJECT_V6))
        return 1;
    if (active & F_PROTO) {
        __u32 proto = k->proto;
        __u8 *ok = filter_protos.lookup(&proto);
        if (!ok || !*ok)
            return 1;
    }
    /* source = initiator: this packet's sender, unless the packet is an answer */
    int src_lo = (dir == 0) != answers(p);
    __u8 ported = !p->no_l4 && (k->proto == PROTO_TCP || k->proto == PROTO_UDP ||
                                k->proto == PROTO_SCTP || k->proto == PROTO_UDPLITE);
    __u32 sport = 0, dport = 0;
    if (ported) {
        sport = src_lo ? k->lo_port : k->hi_port;
        dport = src_lo ? k->hi_port : k->lo_port;
    }
    if (addr_rejected(active, F_SRC_ADDR_MATCH, F_SRC_ADDR_NOT, LIST_SRC_MATCH,
                      src_lo ? k->lo_addr : k->hi_addr, k->ip_ver) ||
        addr_rejected(active, F_DST_ADDR_MATCH, F_DST_ADDR_NOT, LIST_DST_MATCH,
                      src_lo ? k->hi_addr : k->lo_addr, k->ip_ver))
        return 1;
    return port_rejected(active, F_SRC_PORT_MATCH, F_SRC_PORT_NOT, PORT_SRC_MATCH, sport) ||
           port_rejected(active, F_DST_PORT_MATCH, F_DST_PORT_NOT, PORT_DST_MATCH, dport);
}

#ifndef OFFLINE_CLOCK
/*
 * Per-CPU flow cache in front of the flow table (live capture only). Most of a packet's
 * cost is the table lookup (it was the hash map's call and return through the
 * speculation-safe thunks and the key's hash; now the hash and two or three cold lines),
 * so a packet of a flow that is already counted adds to a small direct-mapped slot of its
 * own CPU instead: no hash, no atomics. Only plain packets take it; SYN, FIN and RST and the first packet of each
 * direction still go to the table, so flags that end a flow, handshake times and
 * first-packet metadata stay exact.
 *
 * User space owns the protocol that makes this exact (mermin_cli/engine/cache.py):
 * before each poll it makes `cache_gen` even, which stops every hit and fill, then runs
 * mermin_cache_flush on every CPU, which adds the slots' counts into `flows` (an offline
 * CPU's go through mermin_cache_absorb). Only then does it read and delete entries, and
 * it makes `cache_gen` odd (and new) again after.
 * A flush runs in process context, so a TC program on its CPU can interrupt it but never
 * the other way round, and that program sees the even generation and leaves the slots
 * alone: no atomics on either side. Slots of an older generation are free for any flow.
 */
#define CACHE_SLOTS 256 /* a power of two; 26 KiB per CPU */
#define CACHE_BYPASS (TCP_SYN | TCP_FIN | TCP_RST)

struct cache_slot {
    struct flow_key key;
    __u8  meta_seen;    /* copy of the entry's: directions whose metadata is captured */
    __u8  tcp_flags[2]; /* [dir] flags to OR into the entry */
    __u8  pad;
    __u64 gen;          /* cache_gen when the slot was taken */
    __u64 packets[2];   /* [dir] counts not yet in the entry */
    __u64 bytes[2];
    __u64 last;         /* table_time() of the latest cached packet */
    __u32 entry;        /* the flow's slot in `flows`: a flush needs no lookup */
    __u32 pad2;
};

BPF_PERCPU_ARRAY(flow_cache, struct cache_slot, CACHE_SLOTS);
BPF_ARRAY(cache_gen, __u64, 1); /* odd: cache on; even (0 at load): off */

static __always_inline __u32 cache_index(const __u64 *w)
{
    __u64 h = w[0] ^ w[1] ^ w[2] ^ w[3] ^ w[4] ^ *(const __u32 *)&w[5];
    h ^= h >> 32;
    h ^= h >> 16;
    return (h ^ (h >> 8)) & (CACHE_SLOTS - 1);
}

/* This CPU's slot for the key, or NULL when the cache is off; `gen` is then set. */
static __always_inline struct cache_slot *cache_slot_of(struct flow_key *k, __u64 *gen)
{
    __u32 zero = 0;
    __u64 *g = cache_gen.lookup(&zero);
    if (!g || !(*g & 1))
        return NULL;
    *gen = *g;
    __u32 i = cache_index((const __u64 *)k);
    return flow_cache.lookup(&i);
}

/* Count the packet in its slot if the slot is this flow's and the packet is plain. */
static __always_inline int cache_hit(struct cache_slot *c, int mine, struct pkt *p, __u8 dir,
                                     __u64 now)
{
    if (!mine || !(c->meta_seen & (1 << dir)) || (p->tcp_flags & CACHE_BYPASS))
        return 0;
    if (dir) {
        c->packets[1] += 1;
        c->bytes[1] += p->ip_len;
        c->tcp_flags[1] |= p->tcp_flags;
    } else {
        c->packets[0] += 1;
        c->bytes[0] += p->ip_len;
        c->tcp_flags[0] |= p->tcp_flags;
    }
    c->last = now;
    return 1;
}

/* No pending counts: a slot just taken, or just drained. */
static __always_inline void cache_clear(struct cache_slot *c)
{
    c->packets[0] = 0;
    c->packets[1] = 0;
    c->bytes[0] = 0;
    c->bytes[1] = 0;
    c->tcp_flags[0] = 0;
    c->tcp_flags[1] = 0;
}

/* After a table hit: take a slot of an older generation (first come, first served until
 * the next poll), or refresh our own slot's view of the entry's metadata. */
static __always_inline void cache_fill(struct cache_slot *c, int mine, struct flow_key *k,
                                       __u64 gen, struct flow_stats *s, __u32 entry)
{
    if (!mine) {
        if (c->gen == gen)
            return; /* another flow's this generation */
        __builtin_memcpy(&c->key, k, sizeof(*k));
        c->gen = gen;
        c->entry = entry; /* stays the flow's: deletes wait for a flush (see above) */
        cache_clear(c);
    }
    c->meta_seen = s->meta_seen;
}

/* The generation whose slots a flush drains: the one that just ended (the map holds the
 * even one that turned the cache off). */
static __always_inline __u64 ended_gen(void)
{
    __u32 zero = 0;
    __u64 *g = cache_gen.lookup(&zero);
    return g ? *g - 1 : 0;
}

/* Add one slot's pending counts into its entry and clear them; 1 if there were any. Only
 * counts of the generation that just ended: older ones were added when theirs ended, by
 * mermin_cache_absorb if their CPU was offline then, which leaves the slot as it was. */
static __always_inline int cache_drain(struct cache_slot *c, __u64 ended)
{
    __u64 n = c->packets[0] + c->packets[1];
    if (!n)
        return 0;
    if (c->gen != ended) {
        cache_clear(c);
        return 0;
    }
    __u32 at = c->entry;
    __u64 *ctl = flow_ctl.lookup(&at);
    struct flow_slot *e = ctl && (*ctl & SLOT_STATE) == SLOT_FULL ? slot_of(at, &c->key) : NULL;
    if (e) {
        struct flow_stats *s = &e->stats;
        __sync_fetch_and_add(&s->packets[0], c->packets[0]);
        __sync_fetch_and_add(&s->packets[1], c->packets[1]);
        __sync_fetch_and_add(&s->bytes[0], c->bytes[0]);
        __sync_fetch_and_add(&s->bytes[1], c->bytes[1]);
        s->tcp_flags[0] |= c->tcp_flags[0];
        s->tcp_flags[1] |= c->tcp_flags[1];
        if (c->last > s->last_ns)
            s->last_ns = c->last;
    } else {
        count(CTR_CACHE_LOST, n); /* the protocol above makes this impossible */
    }
    cache_clear(c);
    return 1;
}

/* Run by user space through BPF_PROG_TEST_RUN on each CPU in turn, with the cache off,
 * once per FLUSH_CHUNK slots from skb->cb[0]: the verifier walks every pass of a loop, and
 * one over all 256 slots took 85-105 ms, the longest verification of the load. Returns
 * the CPU it ran on, so user space knows which cache it drained. */
#define FLUSH_CHUNK 16
int mermin_cache_flush(struct __sk_buff *skb)
{
    __u64 ended = ended_gen();
    __u32 first = skb->cb[0];
    for (__u32 i = 0; i < FLUSH_CHUNK; i++) {
        __u32 idx = first + i; /* past the last slot: no element, nothing done */
        struct cache_slot *c = flow_cache.lookup(&idx);
        if (c)
            cache_drain(c, ended);
    }
    return bpf_get_smp_processor_id();
}

/* The slots of a CPU that went offline, which no flush can run on: user space reads them
 * (a per-CPU array hands out every CPU's value) and passes them as the test run's data,
 * after a 14-byte frame header; with the cache off, on any CPU. Returns how many held
 * counts of the ended generation. A slot is only read here, so if its CPU comes back,
 * its own flush must skip those counts: cache_drain() drains the ended generation only. */
#define ABSORB_MAX 16 /* slots per run (a page, the most a test run takes, would hold 39) */
int mermin_cache_absorb(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    __u64 ended = ended_gen();
    int absorbed = 0;
    for (__u32 i = 0; i < ABSORB_MAX; i++) {
        struct cache_slot *rec = data + sizeof(struct ethhdr) + i * sizeof(*rec);
        if ((void *)(rec + 1) > data_end)
            break;
        struct cache_slot c;
        __builtin_memcpy(&c, rec, sizeof(c));
        absorbed += cache_drain(&c, ended);
    }
    return absorbed;
}
#endif

/* Miss path only: 1 if the flow this packet belongs to is filtered out. */
static __always_inline int filtered_out(struct pkt *p, __u8 dir)
{
    __u32 zero = 0;
    struct filter_cfg *cfg = filter_cfg.lookup(&zero);
    if (!cfg || !cfg->active)
        return 0;
    if (filtered.lookup(&p->key)) {
        count(CTR_FILTERED_PKTS, 1);
        return 1;
    }
    if (!rejected(p, dir, cfg->active))
        return 0;
    __u8 one = 1;
    filtered.update(&p->key, &one);
    count(CTR_FILTERED_FLOWS, 1);
    count(CTR_FILTERED_PKTS, 1);
    return 1;
}

/* Hide a value's origin from the compiler, so that it computes it as written. */
#define OPAQUE(x) asm volatile("" : "+r"(x))

/* 1 if the EtherType is an 802.1Q or 802.1ad tag, else 0, computed without a branch.
 * The offset of the IP header is then, to the verifier, one unknown value in a range
 * rather than a constant per number of tags, so it walks the rest of the parse once,
 * not once per tag count: with two tags that was three times the verification of the
 * Ethernet entry point (0.35 s against 0.05-0.07 s, most of the program's load time).
 * (x - 1) >> 31 is 1 only for x == 0, as x < 2^16. */
static __always_inline __u32 is_vlan_tag(__u16 proto)
{
    __u32 q = proto ^ ETH_P_8021Q_BE, ad = proto ^ ETH_P_8021AD_BE;
    return ((q - 1) | (ad - 1)) >> 31;
}

/* Link and network layers of one frame into `p`: 0, or PARSE_NON_IP, or -1 when a header
 * is cut short. The frame starts at `data`; `frame_len` is its length on the wire and
 * `l3_proto` the EtherType of an L3 device's packet (no link header). */
#define PARSE_NON_IP 1
static __always_inline int parse(struct pkt *p, void *data, void *data_end, void *limit,
                                 __u32 frame_len, __u16 l3_proto, const int l2)
{
    __u16 eth_proto = l3_proto;
    __u32 off = 0;

    if (l2) {
        struct ethhdr *eth = data;
        if (CUT(eth, sizeof(*eth)))
            return -1;
        eth_proto = eth->h_proto;
        off = sizeof(*eth);
#pragma unroll
        for (int i = 0; i < MAX_VLAN_TAGS; i++) {
            __u32 tagged = is_vlan_tag(eth_proto);
            __u32 next = off + 4 * tagged;
            OPAQUE(next); /* not `off + 4` below: the verifier must not see a constant */
            if (tagged) {
                __u16 *tag = data + off;
                if (CUT(tag, 4))
                    return -1;
                if (!p->vlan_id)
                    p->vlan_id = bpf_ntohs(tag[0]) & 0x0fff;
                eth_proto = tag[1];
            }
            off = next;
        }
    }

    __u32 l3_len = frame_len > off ? frame_len - off : 0;
    void *l3 = data + off;
    if (eth_proto == ETH_P_IP_BE)
        return parse_ipv4(p, l3, data_end, limit, l3_len);
    if (eth_proto == ETH_P_IPV6_BE)
        return parse_ipv6(p, l3, data_end, limit, l3_len);
    return PARSE_NON_IP;
}

/* parse() of a live packet: the skb's linear data; skb->len counts every segment of a
 * GSO packet. */
static __always_inline int parse_skb(struct __sk_buff *skb, struct pkt *p, const int l2)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    if (l2 && skb->vlan_present)
        p->vlan_id = skb->vlan_tci & 0x0fff; /* tag offloaded out of the data */
    return parse(p, data, data_end, data_end, skb->len, l2 ? 0 : skb->protocol, l2);
}

/* Ingress or egress: at a TC ingress hook the stack has just set the skb's input
 * interface to this device; at egress it is 0 (sent by this host) or the device the
 * packet came in on. Only a packet leaving through the device it arrived on (hairpin
 * forwarding) reads as ingress. Asking this once per flow lets one program serve both
 * hooks: every entry point is another full inlined copy to compile and verify, which
 * is most of the start-up time. */
static __always_inline __u8 hook_of(struct __sk_buff *skb)
{
    return skb->ingress_ifindex == skb->ifindex ? 0 : 1;
}

/* A parsed frame into the flow table: counters for what could not be parsed, else the
 * hit path (update) or the miss path (filters, create). `data` is the frame's start. */
static __always_inline void account(struct __sk_buff *skb, struct pkt *p, int ret,
                                    void *data, void *data_end, const int l2)
{
    if (ret == PARSE_NON_IP) {
        count(CTR_NON_IP, 1);
        return;
    }
    if (ret < 0) {
        count(CTR_TRUNCATED, 1);
        return;
    }
    if (p->no_l4 == NO_L4_FRAGMENT)
        count(CTR_FRAGMENT, 1);
    else if (p->no_l4 == NO_L4_EXT_LIMIT)
        count(CTR_IPV6_EXT_LIMIT, 1);

    p->key.ifindex = skb->ifindex;
    __u8 dir = normalize(&p->key);
    __u64 now = table_time();

#ifndef OFFLINE_CLOCK
    __u64 gen = 0;
    struct cache_slot *c = cache_slot_of(&p->key, &gen);
    int mine = c && c->gen == gen && key_equal((const __u64 *)&c->key, (const __u64 *)&p->key);
    if (c && cache_hit(c, mine, p, dir, now))
        return;
#endif
    __u64 h = flow_hash(&p->key);
    __u32 at = 0;
    struct flow_slot *slot = flow_find(&p->key, h, &at);
    if (slot) {
        update(&slot->stats, p, dir, now);
#ifndef OFFLINE_CLOCK
        if (c)
            cache_fill(c, mine, &p->key, gen, &slot->stats, at);
#endif
        return;
    }
    if (filtered_out(p, dir))
        return;
    if (l2) {
        struct ethhdr *eth = data;
        if ((void *)(eth + 1) <= data_end)
            __builtin_memcpy(p->mac, eth->h_source, 6);
    }
    create(p, dir, hook_of(skb), now, h);
}

/* Common body of the live entry points: `l2` is a compile-time constant per entry point. */
static __always_inline int handle(struct __sk_buff *skb, const int l2)
{
    count(CTR_PACKETS, 1);

    struct pkt *p = new_pkt();
    if (!p)
        return TC_ACT_UNSPEC;
    int ret = parse_skb(skb, p, l2);
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    if (ret < 0 && skb->len > data_end - data) {
        /* A header lies beyond the linear area of a non-linear skb (rare: the stack and
         * drivers keep headers linear, so this is not done up front). Pull it in and parse
         * again. This moves bytes into the linear area (and may copy the head of a cloned
         * skb) but never changes packet content. A second inlined parse(), not a loop: a
         * loop measured 2 % slower on the hit path and compiles no faster. */
        bpf_skb_pull_data(skb, skb->len < PULL_LEN ? skb->len : PULL_LEN);
        __builtin_memset(p, 0, sizeof(*p));
        ret = parse_skb(skb, p, l2);
        data = (void *)(long)skb->data;
        data_end = (void *)(long)skb->data_end;
    }
    account(skb, p, ret, data, data_end, l2);
    return TC_ACT_UNSPEC;
}

#ifndef OFFLINE_CLOCK
/* Both hooks of an Ethernet device, and of an L3 device (tun, wireguard: no link header).
 * Offline only mermin_pcap runs: every entry point is another inlined copy to compile. */
int mermin_l2(struct __sk_buff *skb) { return handle(skb, 1); }
int mermin_l3(struct __sk_buff *skb) { return handle(skb, 0); }
#endif

#ifdef OFFLINE_CLOCK
/*
 * Offline input: classic pcap records, several to a test run. User space hands over a
 * window of records (as they lie in the file, or staged by it from pcapng and other link
 * types); each invocation runs one record through the same parse() and account() as a
 * live packet, then tail-calls this program for the next: one syscall per window (up to
 * 34 records, the kernel's tail-call limit) instead of one per packet. The position and
 * count travel in skb->cb (zero in a test run without a context: passing one costs more
 * than the program's own work here); settings and results in the `offline` map.
 */
struct pcap_rec {
    __u32 sec;
    __u32 frac;   /* microseconds or nanoseconds: offline_state.frac_ns ns each */
    __u32 caplen; /* bytes of the frame that follow */
    __u32 len;    /* the frame's length on the wire */
};
#define REC_MAX_CAPLEN 0x40000 /* libpcap's limit too: longer means a damaged file */
#define WINDOW_MAX 0x8000 /* above any test run's data; keeps every offset in the verifier's 64 KiB */
enum { BATCH_MORE = 0, BATCH_DEADLINE, BATCH_LIMIT, BATCH_DAMAGED };
BPF_PROG_ARRAY(pcap_next, 1);

static __always_inline int batch_stop(struct __sk_buff *skb, struct offline_state *st,
                                      __u64 why)
{
    st->consumed = skb->cb[0];
    st->records = skb->cb[1];
    st->why = why;
    return TC_ACT_UNSPEC;
}

int mermin_pcap(struct __sk_buff *skb)
{
    __u32 zero = 0;
    struct offline_state *st = offline.lookup(&zero);
    if (!st)
        return TC_ACT_UNSPEC; /* cannot happen: an array's element always exists */
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    __u32 off = skb->cb[0];
    struct pcap_rec *r = data + (off & (WINDOW_MAX - 1));
    if (off >= WINDOW_MAX || (void *)(r + 1) > data_end)
        return batch_stop(skb, st, BATCH_MORE);
    __u32 caplen = r->caplen;
    if (caplen > REC_MAX_CAPLEN)
        return batch_stop(skb, st, BATCH_DAMAGED);

    __u64 ts = (__u64)r->sec * 1000000000ULL + (__u64)r->frac * st->frac_ns;
    if (ts >= st->deadline) {
        st->stop_ts = ts;
        return batch_stop(skb, st, BATCH_DEADLINE);
    }
    void *frame = (void *)(r + 1);
    void *limit = frame + caplen;
    __u32 used = off + sizeof(*r) + caplen;
    if (used > skb->len) {
        /* The record goes on past the window. One longer than any window (a jumbo frame,
         * a GSO super-packet) runs alone, clipped to it; any other starts the next one. */
        if (off || sizeof(*r) + caplen <= st->window)
            return batch_stop(skb, st, BATCH_MORE);
        limit = data_end;
    }
    st->now = ts;
    count(CTR_PACKETS, 1);
    struct pkt *p = new_pkt();
    if (!p)
        return TC_ACT_UNSPEC; /* cannot happen, as above */
    int ret = parse(p, frame, data_end, limit, r->len, 0, 1);
    account(skb, p, ret, frame, data_end, 1);
    skb->cb[0] = used;
    skb->cb[1] += 1;
    pcap_next.call(skb, 0);
    /* tail-call limit reached: user space goes on */
    return batch_stop(skb, st, BATCH_LIMIT);
}
#endif
