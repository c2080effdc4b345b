//! The cluster state every Envoy worker shares: node health, in-flight requests, the balancing
//! counters and the queue. It lives in one proxy-wasm shared-data value, updated with
//! compare-and-swap by the glue; here it is a plain value with typed accessors.
//!
//! # Layout
//! The value is a flat little-endian byte array of fixed-size records, read and written in
//! place: no decoding, no allocation per field, and a request touches only the records it
//! needs. Choosing a node by load has to look at every candidate's in-flight count anyway, so
//! one value holding all node records costs one host call to read and one to write, where a
//! key per node would cost a host call per node.
//!
//! ```text
//! header   80 bytes   magic, layout id, node/VM/queue counts, next queue seq, prober lease,
//!                     how many of the nodes are the layout's own, the look-ahead's plan key
//! clients  16 x 16    client hash, requests it was given a node for (fair sharing)
//! vms      24 bytes each: VM id, lease expiry, the layout id of the VM's node list
//! nodes    NODE_BYTES each: the layout's nodes in configuration order, then nodes only
//!          another live configuration has (identified by name hash)
//! inflight u16 per (node, VM): requests that VM has in flight on that node
//! queue    WAITER_BYTES each, oldest first; empty (zero bytes) unless something waits
//! ```
//! Models are identified by a 64-bit hash of their name ([`model_key`]), never by the name, so
//! nothing a client sends can grow the state: it is bounded by the node count, the number of
//! workers and `queue.max_waiting`.
//!
//! # Several configurations at once
//! After a node-list change, the old configuration's VMs keep running (draining listeners,
//! streams in flight) beside the new ones, and both read and write this one value: each lays it
//! out for its own node list when it reads it, with its own nodes first and the nodes only the
//! other has kept after them (not dropped: the other still counts streams on them and holds
//! grants to them). Each VM schedules only the waiters of VMs with its own node list. Once no
//! live VM has another list, the extra nodes are forgotten (on a tick).
//!
//! In-flight counts are kept per VM in a lease that the VM's ticks renew. A VM that crashed (and
//! was reloaded by Envoy's FAIL_RELOAD) never decrements what it held, so its lease simply
//! expires and the counts it held stop counting within `LEASE_TTL_MS`.

use crate::logic::health::NodeHealth;
use crate::logic::schedule::SwitchDecision;

/// The shared-data key of the state.
pub const STATE_KEY: &str = "exo-lb/state/v8";
/// How long a lease lives without renewal. Ticks renew every `LEASE_RENEW_MS`.
pub const LEASE_TTL_MS: u64 = 10_000;
pub const LEASE_RENEW_MS: u64 = 1_000;
/// Generations held after their client left, per node (more replace the soonest to end).
pub const HOLDS_PER_NODE: usize = 2;
/// Models a node said it is not running, remembered per node (more replace the soonest to end).
pub const NOT_RUNNING_PER_NODE: usize = 2;

const MAGIC: u64 = 0x3876_424c_2d4f_5845; // "EXO-LBv8"

/// The fixed part: the header proper, then the client table.
const HEADER_BYTES: usize = H_CLIENTS + CLIENTS * 16;
/// Clients whose share of the nodes is tracked (the busiest recent ones).
pub const CLIENTS: usize = 16;
const H_CLIENTS: usize = 80;
const H_MAGIC: usize = 0;
const H_LAYOUT: usize = 8;
const H_NODES: usize = 16;
const H_VMS: usize = 24;
const H_QUEUE: usize = 32;
const H_NEXT_SEQ: usize = 40;
const H_PROBER_VM: usize = 48;
const H_PROBER_EXPIRES: usize = 56;
const H_OWN_NODES: usize = 64;
/// What the look-ahead's plan was made for ([`ClusterState::plan_key`]).
const H_PLAN_KEY: usize = 72;

pub const VM_BYTES: usize = 24;

/// One node's record.
pub const NODE_BYTES: usize = N_PLAN + 8;
const N_HASH: usize = 0;
const N_FAILS: usize = 8;
const N_FLAGS: usize = 16;
const N_LAST_FAIL: usize = 24;
const N_OUT_UNTIL: usize = 32;
const N_PROBE_VM: usize = 40;
const N_RR: usize = 48;
const N_PICKS: usize = 56;
const N_WARM: usize = 64;
const N_SERVED: usize = 72;
const N_FAILURES: usize = 80;
const N_SWITCHES: usize = 88;
const N_NEXT_CHECK: usize = 96;
const N_HOLDS: usize = 104;
const N_NOT_RUNNING: usize = N_HOLDS + 8 * HOLDS_PER_NODE;
/// When the node was sent a request that makes it load another model, until its first token.
const N_SWITCH_SINCE: usize = N_NOT_RUNNING + 16 * NOT_RUNNING_PER_NODE;
/// How long the node's last such request took to its first byte.
const N_SWITCH_TOOK: usize = N_SWITCH_SINCE + 8;
/// When the last request the node was given is expected to end (its grant time plus its
/// expected work).
const N_BUSY_UNTIL: usize = N_SWITCH_TOOK + 8;
/// When the node may next be asked what it has loaded (0: now; `u64::MAX`: never).
const N_NEXT_DISCOVERY: usize = N_BUSY_UNTIL + 8;
/// The model the look-ahead plans the node for (with `F_PLAN_SERVE`).
const N_PLAN: usize = N_NEXT_DISCOVERY + 8;

const F_OUT: u64 = 1;
const F_PROBE_VM: u64 = 2;
const F_PROBE_DOWN: u64 = 4;
const F_WARM: u64 = 8;
const F_SWITCH_STREAM: u64 = 16;
/// The node has holds or not-running marks on record (both rare): without them, deciding
/// where a request goes skips reading their fields on every node.
const F_HOLDS: u64 = 32;
const F_MARKS: u64 = 64;
/// Asks of the node for what it has loaded that are still unanswered, one bit per place it may
/// tell (`discover::Source::bit`).
const F_DISCOVERY_ASKS: u64 = 128 | 256;
const DISCOVERY_ASKS_SHIFT: u32 = 7;
/// A place asked answered (not a failure) since the node was last asked.
const F_DISCOVERY_ANSWERED: u64 = 512;
/// The look-ahead's plan for the node: hold it, or keep it for the model in `N_PLAN`.
const F_PLAN_HOLD: u64 = 1024;
const F_PLAN_SERVE: u64 = 2048;
/// The node's request was granted before its work could be estimated: its expected end was set
/// with the prior and is read again once its model's service is measured.
const F_BUSY_GUESSED: u64 = 4096;

/// One queued request's record.
pub const WAITER_BYTES: usize = 96;
const W_SEQ: usize = 0;
const W_VM: usize = 8;
const W_CTX: usize = 16;
const W_MODEL: usize = 24;
const W_HASH_KEY: usize = 32;
const W_RANDOM: usize = 40;
const W_ENQUEUED: usize = 48;
const W_GRANT: usize = 56;
const W_GRANT_ARG: usize = 64;
const W_CLIENT: usize = 72;
const W_WORK: usize = 80;
const W_ROUND: usize = 88;

const G_NONE: u64 = 0;
const G_NODE: u64 = 1;
const G_UNAVAILABLE: u64 = 2;
const G_TOO_LATE: u64 = 3;
const G_PROBING: u64 = 1 << 8;
const G_SWITCHED: u64 = 1 << 9;
const G_HAS_HASH_KEY: u64 = 1 << 10;
const G_COLD: u64 = 1 << 11;
const G_STREAM: u64 = 1 << 12;

/// FNV-1a, 64 bits.
pub fn fnv1a(bytes: &[u8], seed: u64) -> u64 {
    bytes.iter().fold(seed, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// splitmix64's finaliser: spreads a hash over all bits.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// How the shared state names a model: a hash of its id (collisions at 64 bits are not a
/// practical concern for the handful of models a cluster serves).
pub fn model_key(model: &str) -> u64 {
    mix(fnv1a(model.as_bytes(), FNV_OFFSET))
}

/// How the shared state recognises a node's record after the node list changed.
pub fn node_key(name: &str) -> u64 {
    mix(fnv1a(name.as_bytes(), fnv1a(b"node", FNV_OFFSET)))
}

/// The node list a state is laid out for: the name key of each node, in configuration order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Layout {
    pub nodes: Vec<u64>,
    pub id: u64,
}

impl Layout {
    pub fn new<'a>(names: impl IntoIterator<Item = &'a str>) -> Layout {
        let nodes: Vec<u64> = names.into_iter().map(node_key).collect();
        let id = mix(nodes.iter().fold(FNV_OFFSET, |h, k| fnv1a(&k.to_le_bytes(), h)) ^ nodes.len() as u64);
        Layout { nodes, id }
    }
}

/// A request waiting for a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Waiter {
    pub seq: u64,
    /// The VM and stream context holding the paused request.
    pub vm: u64,
    pub ctx: u32,
    /// [`model_key`] of the requested model.
    pub model: u64,
    /// A hash of the request's `hash` policy key.
    pub hash_key: Option<u64>,
    /// It asked for a streamed reply.
    pub stream: bool,
    pub random: u64,
    pub enqueued_ms: u64,
    /// Who sent it (API key or client address), for fairness between clients.
    pub client: u64,
    /// The work it is expected to bring (ms on a warm node), for the scheduler's backlog; 0:
    /// nothing was measured for its model when it came (the scheduler reads what is measured
    /// since, `schedule::expected_work`).
    pub work_ms: u64,
    /// Its client's round when it arrived (fair sharing between clients).
    pub round: u64,
    /// Set by the scheduler; the owning VM picks it up on its next tick.
    pub grant: Option<Grant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    /// A slot on `node` is booked in the waiter's VM lease.
    Node { node: usize, probing: bool, switched: bool, cold: bool },
    /// Every node for the model went out while it waited.
    Unavailable { retry_after_s: u64 },
    /// No switch could start it in time ([`crate::logic::schedule`]'s `too_late`): the soonest
    /// a node could.
    TooLate { start_in_s: u64 },
}

/// What the look-ahead ([`crate::logic::lookahead`]) decided for a free node, where it
/// overrides the scheduler's rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Planned {
    /// Take no request until the plan is made again.
    Hold,
    /// Take only a request for this model ([`model_key`]).
    Serve(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProberLease {
    pub vm: u64,
    pub expires_ms: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeCounters {
    pub served: u64,
    pub failures: u64,
    pub switches: u64,
}

fn read(bytes: &[u8], at: usize) -> u64 {
    at.checked_add(8)
        .and_then(|end| bytes.get(at..end))
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map_or(0, u64::from_le_bytes)
}

fn write(bytes: &mut [u8], at: usize, value: u64) {
    if let Some(s) = at.checked_add(8).and_then(|end| bytes.get_mut(at..end)) {
        s.copy_from_slice(&value.to_le_bytes());
    }
}

fn read16(bytes: &[u8], at: usize) -> u16 {
    at.checked_add(2)
        .and_then(|end| bytes.get(at..end))
        .and_then(|s| <[u8; 2]>::try_from(s).ok())
        .map_or(0, u16::from_le_bytes)
}

fn write16(bytes: &mut [u8], at: usize, value: u16) {
    if let Some(s) = at.checked_add(2).and_then(|end| bytes.get_mut(at..end)) {
        s.copy_from_slice(&value.to_le_bytes());
    }
}

fn count(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// The shared cluster state. Always well formed: every accessor's offsets are inside `bytes`
/// (and would read 0 / write nothing if they were not, rather than trap).
#[derive(Clone)]
pub struct ClusterState {
    bytes: Vec<u8>,
    /// The header's node and VM counts, kept at hand: every offset depends on them.
    nodes: usize,
    vms: usize,
    /// The switches decided since this copy was read, for the log (never shared: whoever
    /// decided them says why, [`ClusterState::take_switches`]).
    switches: Vec<SwitchDecision>,
    /// Whether the look-ahead made a new plan (played its futures) on this copy since it was
    /// read, for the glue to time (never shared, [`ClusterState::take_looked_ahead`]).
    looked_ahead: bool,
}

/// Two states are equal when their shared bytes are.
impl PartialEq for ClusterState {
    fn eq(&self, other: &ClusterState) -> bool {
        self.bytes == other.bytes
    }
}

impl Eq for ClusterState {}

impl std::fmt::Debug for ClusterState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let vms: Vec<(u64, u64)> = (0..self.vm_count()).map(|s| (self.vm_id(s), self.vm_expires(s))).collect();
        let nodes: Vec<String> = (0..self.node_count())
            .map(|i| {
                let row: Vec<u16> = (0..self.vm_count()).map(|s| self.cell(i, s)).collect();
                format!("#{i} {:?} inflight {row:?} warm {:?} {:?}", self.health(i), self.warm(i), self.counters(i))
            })
            .collect();
        let queue: Vec<Waiter> = (0..self.queue_len()).filter_map(|k| self.waiter(k)).collect();
        f.debug_struct("ClusterState").field("vms", &vms).field("nodes", &nodes).field("queue", &queue).finish()
    }
}

impl ClusterState {
    /// A fresh state for `layout`: every node healthy and idle, no VM, empty queue.
    pub fn new(layout: &Layout) -> ClusterState {
        ClusterState::laid_out(layout, &[])
    }

    /// A fresh state for `layout`'s nodes followed by `extra` nodes (another configuration's).
    fn laid_out(layout: &Layout, extra: &[u64]) -> ClusterState {
        let keys: Vec<u64> = layout.nodes.iter().chain(extra).copied().collect();
        let mut bytes = vec![0u8; HEADER_BYTES + keys.len() * NODE_BYTES];
        write(&mut bytes, H_MAGIC, MAGIC);
        write(&mut bytes, H_LAYOUT, layout.id);
        write(&mut bytes, H_NODES, keys.len() as u64);
        write(&mut bytes, H_OWN_NODES, layout.nodes.len() as u64);
        for (i, key) in keys.iter().enumerate() {
            write(&mut bytes, HEADER_BYTES + i * NODE_BYTES + N_HASH, *key);
        }
        ClusterState::wrap(bytes)
    }

    fn wrap(bytes: Vec<u8>) -> ClusterState {
        let mut state = ClusterState { bytes, nodes: 0, vms: 0, switches: Vec::new(), looked_ahead: false };
        state.sync_counts();
        state
    }

    /// Re-reads the counts from the header (after the layout changed).
    fn sync_counts(&mut self) {
        self.nodes = count(read(&self.bytes, H_NODES));
        self.vms = count(read(&self.bytes, H_VMS));
    }

    /// Reads the state for this VM's `layout`. Absent or malformed bytes give the fresh state
    /// (which is safe: every node healthy and idle). A state written for another node list
    /// (a configuration change) is carried over node by node, by name.
    pub fn decode(bytes: Option<&[u8]>, layout: &Layout) -> ClusterState {
        match bytes {
            Some(b) => ClusterState::from_bytes(b.to_vec(), layout),
            None => ClusterState::new(layout),
        }
    }

    /// Like [`ClusterState::decode`], taking ownership of the bytes (no copy).
    pub fn from_bytes(bytes: Vec<u8>, layout: &Layout) -> ClusterState {
        let state = ClusterState::wrap(bytes);
        if !state.well_formed() {
            ClusterState::new(layout)
        } else if state.layout_id() == layout.id {
            state
        } else {
            state.relaid(layout, true)
        }
    }

    pub fn encode(&self) -> &[u8] {
        &self.bytes
    }

    fn well_formed(&self) -> bool {
        let b = &self.bytes;
        if b.len() < HEADER_BYTES || read(b, H_MAGIC) != MAGIC || read(b, H_OWN_NODES) > read(b, H_NODES) {
            return false;
        }
        let (nodes, vms, queue) = (count(read(b, H_NODES)), count(read(b, H_VMS)), count(read(b, H_QUEUE)));
        let expected = nodes
            .checked_mul(NODE_BYTES)
            .and_then(|n| vms.checked_mul(VM_BYTES).and_then(|v| n.checked_add(v)))
            .and_then(|s| nodes.checked_mul(vms).and_then(|m| m.checked_mul(2)).and_then(|m| s.checked_add(m)))
            .and_then(|s| queue.checked_mul(WAITER_BYTES).and_then(|q| s.checked_add(q)))
            .and_then(|s| s.checked_add(HEADER_BYTES));
        expected == Some(b.len())
    }

    /// This state carried over to another node list: records of nodes that stay move to their
    /// new place, new nodes start fresh. Nodes that are not in `layout` are kept after its own
    /// while a live VM may still use them (`keep_others`), else forgotten, with their in-flight
    /// counts and the grants of waiters booked on them.
    fn relaid(&self, layout: &Layout, keep_others: bool) -> ClusterState {
        let others: Vec<u64> = if keep_others {
            (0..self.node_count()).map(|j| self.node_key(j)).filter(|k| !layout.nodes.contains(k)).collect()
        } else {
            Vec::new()
        };
        let mut out = ClusterState::laid_out(layout, &others);
        let old_index = |key: u64| (0..self.node_count()).find(|&j| self.node_key(j) == key);
        let moved: Vec<Option<usize>> = (0..out.node_count()).map(|i| old_index(out.node_key(i))).collect();
        for (i, from) in moved.iter().enumerate() {
            if let Some(src) = from.and_then(|j| self.node_range(j)) {
                let record = self.bytes.get(src).map(<[u8]>::to_vec).unwrap_or_default();
                if let Some(dst) = out.node_range(i) {
                    if let Some(slot) = out.bytes.get_mut(dst) {
                        if slot.len() == record.len() {
                            slot.copy_from_slice(&record);
                        }
                    }
                }
            }
        }
        for s in 0..self.vm_count() {
            let slot = out.add_vm(self.vm_id(s));
            out.set_vm_expires(slot, self.vm_expires(s));
            out.set_vm_layout(slot, self.vm_layout(s));
            for (i, from) in moved.iter().enumerate() {
                if let Some(from) = from {
                    out.set_cell(i, slot, self.cell(*from, s));
                }
            }
        }
        write(&mut out.bytes, H_NEXT_SEQ, self.next_seq());
        if let (Some(src), Some(dst)) =
            (self.bytes.get(H_CLIENTS..HEADER_BYTES), out.bytes.get_mut(H_CLIENTS..HEADER_BYTES))
        {
            dst.copy_from_slice(src);
        }
        out.set_prober(self.prober());
        for k in 0..self.queue_len() {
            if let Some(mut w) = self.waiter(k) {
                if let Some(Grant::Node { node, probing, switched, cold }) = w.grant {
                    w.grant = Some(match moved.iter().position(|from| *from == Some(node)) {
                        Some(new) => Grant::Node { node: new, probing, switched, cold },
                        None => Grant::Unavailable { retry_after_s: 1 },
                    });
                }
                out.push_waiter(&w);
            }
        }
        out
    }

    /// The id of the node list this state is laid out for (its first nodes).
    pub fn layout_id(&self) -> u64 {
        read(&self.bytes, H_LAYOUT)
    }

    /// Whether VM `vm` runs with the node list this state is laid out for (a VM not known yet
    /// is taken to: it is the one reading).
    pub fn same_layout(&self, vm: u64) -> bool {
        self.vm_slot(vm).is_none_or(|s| self.vm_layout(s) == self.layout_id())
    }

    /// Nodes of another configuration's node list, kept after this layout's own.
    fn other_nodes(&self) -> usize {
        self.node_count().saturating_sub(count(read(&self.bytes, H_OWN_NODES)))
    }

    // ---- header ----

    pub fn node_count(&self) -> usize {
        self.nodes
    }

    fn vm_count(&self) -> usize {
        self.vms
    }

    pub fn queue_len(&self) -> usize {
        count(read(&self.bytes, H_QUEUE))
    }

    /// Takes the next arrival number (FIFO order across workers).
    pub fn take_seq(&mut self) -> u64 {
        let seq = self.next_seq();
        write(&mut self.bytes, H_NEXT_SEQ, seq.wrapping_add(1));
        seq
    }

    fn next_seq(&self) -> u64 {
        read(&self.bytes, H_NEXT_SEQ)
    }

    /// The VM that runs the active health checks.
    pub fn prober(&self) -> Option<ProberLease> {
        let vm = read(&self.bytes, H_PROBER_VM);
        (vm != 0).then(|| ProberLease { vm, expires_ms: read(&self.bytes, H_PROBER_EXPIRES) })
    }

    pub fn set_prober(&mut self, lease: Option<ProberLease>) {
        let (vm, expires) = lease.map_or((0, 0), |l| (l.vm, l.expires_ms));
        write(&mut self.bytes, H_PROBER_VM, vm);
        write(&mut self.bytes, H_PROBER_EXPIRES, expires);
    }

    // ---- clients ----

    fn client_entry(&self, k: usize) -> (u64, u64) {
        (read(&self.bytes, H_CLIENTS + 16 * k), read(&self.bytes, H_CLIENTS + 16 * k + 8))
    }

    /// The lowest count of the clients tracked (where a new client starts, so that it gets
    /// its share from now on, not everything the others had).
    fn clients_floor(&self) -> u64 {
        (0..CLIENTS).map(|k| self.client_entry(k)).filter(|e| e.0 != 0).map(|e| e.1).min().unwrap_or(0)
    }

    /// How many requests of `client` were given a node (relative to the other clients).
    pub fn client_share(&self, client: u64) -> u64 {
        (0..CLIENTS)
            .map(|k| self.client_entry(k))
            .find(|e| e.0 == client && client != 0)
            .map_or_else(|| self.clients_floor(), |e| e.1)
    }

    /// Counts a request of `client` given a node. A client not tracked takes the place of
    /// the one with the lowest count.
    pub fn count_client(&mut self, client: u64) {
        if client == 0 {
            return;
        }
        let slot = (0..CLIENTS).find(|&k| self.client_entry(k).0 == client);
        let (slot, base) = match slot {
            Some(k) => (k, self.client_entry(k).1),
            None => {
                let floor = self.clients_floor();
                let k =
                    (0..CLIENTS).min_by_key(|&k| (self.client_entry(k).0 != 0, self.client_entry(k).1)).unwrap_or(0);
                (k, floor)
            }
        };
        write(&mut self.bytes, H_CLIENTS + 16 * slot, client);
        write(&mut self.bytes, H_CLIENTS + 16 * slot + 8, base.saturating_add(1));
    }

    // ---- VM leases ----

    fn vms_at(&self) -> usize {
        HEADER_BYTES
    }

    fn vm_id(&self, slot: usize) -> u64 {
        read(&self.bytes, self.vms_at() + slot * VM_BYTES)
    }

    fn vm_expires(&self, slot: usize) -> u64 {
        read(&self.bytes, self.vms_at() + slot * VM_BYTES + 8)
    }

    fn set_vm_expires(&mut self, slot: usize, expires_ms: u64) {
        let at = self.vms_at() + slot * VM_BYTES + 8;
        write(&mut self.bytes, at, expires_ms);
    }

    /// The layout id of the VM's node list.
    fn vm_layout(&self, slot: usize) -> u64 {
        read(&self.bytes, self.vms_at() + slot * VM_BYTES + 16)
    }

    fn set_vm_layout(&mut self, slot: usize, layout: u64) {
        let at = self.vms_at() + slot * VM_BYTES + 16;
        write(&mut self.bytes, at, layout);
    }

    fn vm_slot(&self, vm: u64) -> Option<usize> {
        (0..self.vm_count()).find(|&s| self.vm_id(s) == vm)
    }

    /// Adds a VM (its lease and an in-flight column); returns its slot. Rare: once per VM.
    fn add_vm(&mut self, vm: u64) -> usize {
        if let Some(slot) = self.vm_slot(vm) {
            return slot;
        }
        let (nodes, vms) = (self.node_count(), self.vm_count());
        let cells: Vec<Vec<u16>> = (0..nodes).map(|i| (0..vms).map(|s| self.cell(i, s)).collect()).collect();
        let queue = self.queue_bytes().to_vec();
        let at = self.vms_at() + vms * VM_BYTES;
        let mut record = [0u8; VM_BYTES];
        write(&mut record, 0, vm);
        // A VM first appears in a state read for its own node list.
        write(&mut record, 16, self.layout_id());
        let tail_start = self.matrix_at();
        self.bytes.truncate(tail_start);
        // The VM table grows by one record in front of the node records.
        let nodes_bytes = self.bytes.split_off(at.min(self.bytes.len()));
        self.bytes.extend_from_slice(&record);
        self.bytes.extend_from_slice(&nodes_bytes);
        write(&mut self.bytes, H_VMS, (vms + 1) as u64);
        self.sync_counts();
        for row in &cells {
            for s in 0..=vms {
                let v = row.get(s).copied().unwrap_or(0);
                self.bytes.extend_from_slice(&v.to_le_bytes());
            }
        }
        self.bytes.extend_from_slice(&queue);
        vms
    }

    /// Removes the VMs in `dead` (slots); returns the in-flight requests they held.
    fn remove_vms(&mut self, dead: &[usize]) -> u32 {
        if dead.is_empty() {
            return 0;
        }
        let (nodes, vms) = (self.node_count(), self.vm_count());
        let keep: Vec<usize> = (0..vms).filter(|s| !dead.contains(s)).collect();
        let reclaimed =
            (0..nodes).flat_map(|i| dead.iter().map(move |&s| (i, s))).map(|(i, s)| u32::from(self.cell(i, s))).sum();
        let mut out = Vec::with_capacity(self.bytes.len());
        out.extend_from_slice(self.bytes.get(..HEADER_BYTES).unwrap_or_default());
        for &s in &keep {
            let at = self.vms_at() + s * VM_BYTES;
            out.extend_from_slice(self.bytes.get(at..at + VM_BYTES).unwrap_or_default());
        }
        let nodes_at = self.nodes_at();
        out.extend_from_slice(self.bytes.get(nodes_at..nodes_at + nodes * NODE_BYTES).unwrap_or_default());
        for i in 0..nodes {
            for &s in &keep {
                out.extend_from_slice(&self.cell(i, s).to_le_bytes());
            }
        }
        out.extend_from_slice(self.queue_bytes());
        write(&mut out, H_VMS, keep.len() as u64);
        self.bytes = out;
        self.sync_counts();
        reclaimed
    }

    pub fn lease_alive(&self, vm: u64, now_ms: u64) -> bool {
        self.vm_slot(vm).is_some_and(|s| self.vm_expires(s) > now_ms)
    }

    /// Keeps a VM's lease alive while it has requests in flight or waiting.
    pub fn touch_lease(&mut self, vm: u64, now_ms: u64) {
        let slot = self.add_vm(vm);
        self.set_vm_expires(slot, now_ms.saturating_add(LEASE_TTL_MS));
    }

    /// Extends this VM's lease (a tick), and drops the leases of VMs that stopped renewing,
    /// with what they held. Returns the number of in-flight requests reclaimed.
    pub fn renew_and_prune(&mut self, vm: u64, now_ms: u64) -> u32 {
        if let Some(slot) = self.vm_slot(vm) {
            self.set_vm_expires(slot, now_ms.saturating_add(LEASE_TTL_MS));
        }
        let dead: Vec<usize> = (0..self.vm_count()).filter(|&s| self.vm_expires(s) <= now_ms).collect();
        let dead_ids: Vec<u64> = dead.iter().map(|&s| self.vm_id(s)).collect();
        let reclaimed = self.remove_vms(&dead);
        // Requests paused in a VM that is gone can never be resumed.
        if !dead_ids.is_empty() {
            self.retain_waiters(|w| !dead_ids.contains(&w.vm));
        }
        if self.prober().is_some_and(|p| p.expires_ms <= now_ms) {
            self.set_prober(None);
        }
        // The other configuration's VMs are all gone: so are the nodes only they had.
        if self.other_nodes() > 0 && (0..self.vm_count()).all(|s| self.vm_layout(s) == self.layout_id()) {
            let own: Vec<u64> =
                (0..self.node_count().saturating_sub(self.other_nodes())).map(|i| self.node_key(i)).collect();
            let layout = Layout { nodes: own, id: self.layout_id() };
            *self = self.relaid(&layout, false);
        }
        for i in 0..self.node_count() {
            // Holds that ended free their slot for good.
            if self.field(i, N_FLAGS) & F_HOLDS != 0 {
                for k in 0..HOLDS_PER_NODE {
                    let at = self.node_at(i) + N_HOLDS + 8 * k;
                    if read(&self.bytes, at) <= now_ms {
                        write(&mut self.bytes, at, 0);
                    }
                }
                if (0..HOLDS_PER_NODE).all(|k| self.field(i, N_HOLDS + 8 * k) == 0) {
                    self.clear_flags(i, F_HOLDS);
                }
            }
            // A probe held by a VM that is gone will never report back.
            let mut h = self.health(i);
            if h.probe_vm.is_some_and(|p| !self.lease_alive(p, now_ms)) {
                h.probe_vm = None;
                self.set_health(i, &h);
            }
        }
        reclaimed
    }

    // ---- nodes ----

    fn nodes_at(&self) -> usize {
        self.vms_at() + self.vm_count() * VM_BYTES
    }

    fn node_at(&self, i: usize) -> usize {
        self.nodes_at() + i * NODE_BYTES
    }

    fn node_range(&self, i: usize) -> Option<std::ops::Range<usize>> {
        (i < self.node_count()).then(|| self.node_at(i)..self.node_at(i) + NODE_BYTES)
    }

    fn node_key(&self, i: usize) -> u64 {
        read(&self.bytes, self.node_at(i) + N_HASH)
    }

    fn field(&self, i: usize, f: usize) -> u64 {
        if i >= self.node_count() {
            return 0;
        }
        read(&self.bytes, self.node_at(i) + f)
    }

    fn set_field(&mut self, i: usize, f: usize, value: u64) {
        if i < self.node_count() {
            let at = self.node_at(i) + f;
            write(&mut self.bytes, at, value);
        }
    }

    pub fn health(&self, i: usize) -> NodeHealth {
        let flags = self.field(i, N_FLAGS);
        NodeHealth {
            fails: u32::try_from(self.field(i, N_FAILS)).unwrap_or(u32::MAX),
            last_fail_ms: self.field(i, N_LAST_FAIL),
            out_until_ms: (flags & F_OUT != 0).then(|| self.field(i, N_OUT_UNTIL)),
            probe_vm: (flags & F_PROBE_VM != 0).then(|| self.field(i, N_PROBE_VM)),
            probe_down: flags & F_PROBE_DOWN != 0,
        }
    }

    pub fn set_health(&mut self, i: usize, h: &NodeHealth) {
        let keep = self.field(i, N_FLAGS) & !(F_OUT | F_PROBE_VM | F_PROBE_DOWN);
        let flags = keep
            | if h.out_until_ms.is_some() { F_OUT } else { 0 }
            | if h.probe_vm.is_some() { F_PROBE_VM } else { 0 }
            | if h.probe_down { F_PROBE_DOWN } else { 0 };
        self.set_field(i, N_FLAGS, flags);
        self.set_field(i, N_FAILS, u64::from(h.fails));
        self.set_field(i, N_LAST_FAIL, h.last_fail_ms);
        self.set_field(i, N_OUT_UNTIL, h.out_until_ms.unwrap_or(0));
        self.set_field(i, N_PROBE_VM, h.probe_vm.unwrap_or(0));
    }

    /// Applies `change` to node `i`'s health.
    pub fn update_health(&mut self, i: usize, change: impl FnOnce(&mut NodeHealth)) {
        let mut h = self.health(i);
        change(&mut h);
        self.set_health(i, &h);
    }

    fn matrix_at(&self) -> usize {
        self.nodes_at() + self.node_count() * NODE_BYTES
    }

    fn cell_at(&self, i: usize, slot: usize) -> usize {
        self.matrix_at() + (i * self.vm_count() + slot) * 2
    }

    fn cell(&self, i: usize, slot: usize) -> u16 {
        if i >= self.node_count() || slot >= self.vm_count() {
            return 0;
        }
        read16(&self.bytes, self.cell_at(i, slot))
    }

    fn set_cell(&mut self, i: usize, slot: usize, value: u16) {
        if i < self.node_count() && slot < self.vm_count() {
            let at = self.cell_at(i, slot);
            write16(&mut self.bytes, at, value);
        }
    }

    /// Requests in flight on node `i`, summed over the live leases of all VMs.
    pub fn inflight(&self, i: usize, now_ms: u64) -> u32 {
        (0..self.vm_count())
            .filter(|&s| self.vm_expires(s) > now_ms)
            .fold(0u32, |sum, s| sum.saturating_add(u32::from(self.cell(i, s))))
    }

    /// Every VM lease: its id, expiry and in-flight count per node (for tests and diagnostics).
    pub fn leases(&self) -> Vec<(u64, u64, Vec<u16>)> {
        (0..self.vm_count())
            .map(|s| (self.vm_id(s), self.vm_expires(s), (0..self.node_count()).map(|i| self.cell(i, s)).collect()))
            .collect()
    }

    /// Every in-flight count in every lease, alive or not (what a leak would leave behind).
    pub fn inflight_recorded(&self) -> u32 {
        (0..self.node_count())
            .flat_map(|i| (0..self.vm_count()).map(move |s| (i, s)))
            .fold(0u32, |sum, (i, s)| sum.saturating_add(u32::from(self.cell(i, s))))
    }

    pub fn acquire(&mut self, vm: u64, i: usize, now_ms: u64) {
        let slot = self.add_vm(vm);
        self.set_vm_expires(slot, now_ms.saturating_add(LEASE_TTL_MS));
        let n = self.cell(i, slot);
        self.set_cell(i, slot, n.saturating_add(1));
    }

    /// Gives back one request on node `i`. Never goes below zero: a lease that expired and was
    /// pruned has already given everything back.
    pub fn release(&mut self, vm: u64, i: usize) {
        if let Some(slot) = self.vm_slot(vm) {
            let n = self.cell(i, slot);
            self.set_cell(i, slot, n.saturating_sub(1));
        }
    }

    /// Generations still running on node `i` for clients that left.
    pub fn held(&self, i: usize, now_ms: u64) -> u32 {
        if self.field(i, N_FLAGS) & F_HOLDS == 0 {
            return 0;
        }
        (0..HOLDS_PER_NODE).filter(|k| self.field(i, N_HOLDS + 8 * k) > now_ms).count() as u32
    }

    /// Counts node `i` busy until `until_ms` (a generation whose client left).
    pub fn add_hold(&mut self, i: usize, until_ms: u64) {
        let soonest = (0..HOLDS_PER_NODE).min_by_key(|k| self.field(i, N_HOLDS + 8 * k)).unwrap_or(0);
        if self.field(i, N_HOLDS + 8 * soonest) < until_ms {
            self.set_field(i, N_HOLDS + 8 * soonest, until_ms);
            self.set_flags(i, F_HOLDS);
        }
    }

    fn set_flags(&mut self, i: usize, bits: u64) {
        let flags = self.field(i, N_FLAGS);
        self.set_field(i, N_FLAGS, flags | bits);
    }

    fn clear_flags(&mut self, i: usize, bits: u64) {
        let flags = self.field(i, N_FLAGS);
        self.set_field(i, N_FLAGS, flags & !bits);
    }

    /// In flight plus held by a generation whose client left: what counts against the cap.
    pub fn busy(&self, i: usize, now_ms: u64) -> u32 {
        self.inflight(i, now_ms).saturating_add(self.held(i, now_ms))
    }

    /// [`ClusterState::busy`] of every node, in one pass: a decision asks about each node's
    /// load several times (is it free, how it ranks, the failover list), and over hundreds of
    /// nodes asking the leases each time was most of a request's work.
    pub fn loads(&self, now_ms: u64) -> Vec<u32> {
        let vms = self.vm_count();
        let live: Vec<bool> = (0..vms).map(|s| self.vm_expires(s) > now_ms).collect();
        let matrix = self.bytes.get(self.matrix_at()..).unwrap_or_default();
        let mut loads = Vec::with_capacity(self.node_count());
        for i in 0..self.node_count() {
            let row = matrix.get(i * vms * 2..(i + 1) * vms * 2).unwrap_or_default();
            let inflight = row.chunks_exact(2).zip(&live).filter(|(_, &live)| live).fold(0u32, |sum, (cell, _)| {
                sum.saturating_add(u32::from(<[u8; 2]>::try_from(cell).map_or(0, u16::from_le_bytes)))
            });
            loads.push(inflight.saturating_add(self.held(i, now_ms)));
        }
        loads
    }

    /// Node `i` has nothing on record that keeps it from a request: not out, not down by its
    /// checks, no model it said it is not running (one field read: what every decision asks of
    /// every node).
    pub fn unremarkable(&self, i: usize) -> bool {
        self.field(i, N_FLAGS) & (F_OUT | F_PROBE_DOWN | F_MARKS) == 0
    }

    /// Node `i`'s [`NodeHealth::phase`]; one field read for a node with nothing on record.
    pub fn phase(&self, i: usize, now_ms: u64, active_checks: bool) -> crate::logic::health::Phase {
        if self.field(i, N_FLAGS) & (F_OUT | F_PROBE_DOWN) == 0 {
            return crate::logic::health::Phase::Up;
        }
        self.health(i).phase(now_ms, active_checks)
    }

    /// Smooth weighted round robin's current weight.
    pub fn rr(&self, i: usize) -> i64 {
        self.field(i, N_RR) as i64
    }

    pub fn set_rr(&mut self, i: usize, weight: i64) {
        self.set_field(i, N_RR, weight as u64);
    }

    /// Times node `i` was chosen first (spreads ties evenly).
    pub fn picks(&self, i: usize) -> u64 {
        self.field(i, N_PICKS)
    }

    pub fn count_pick(&mut self, i: usize) {
        let n = self.picks(i);
        self.set_field(i, N_PICKS, n.wrapping_add(1));
    }

    /// The [`model_key`] of the model node `i` ran last (its warm model).
    pub fn warm(&self, i: usize) -> Option<u64> {
        (self.field(i, N_FLAGS) & F_WARM != 0).then(|| self.field(i, N_WARM))
    }

    /// Records that node `i` runs `model` now; counts a switch when it ran another one.
    /// Returns whether that was a switch.
    pub fn set_warm(&mut self, i: usize, model: u64) -> bool {
        let switched = match self.warm(i) {
            Some(current) if current == model => return false,
            Some(_) => true,
            None => false,
        };
        if switched {
            let n = self.field(i, N_SWITCHES);
            self.set_field(i, N_SWITCHES, n.saturating_add(1));
        }
        self.set_flags(i, F_WARM);
        self.set_field(i, N_WARM, model);
        switched
    }

    /// Node `i` was sent, at `now_ms`, a request that makes it load its (new) warm model, or
    /// may (what it had loaded was not known); `stream`: the reply is streamed, so its first
    /// byte ends the switch.
    pub fn start_switch(&mut self, i: usize, now_ms: u64, stream: bool) {
        let flags = self.field(i, N_FLAGS);
        self.set_field(i, N_FLAGS, if stream { flags | F_SWITCH_STREAM } else { flags & !F_SWITCH_STREAM });
        self.set_field(i, N_SWITCH_SINCE, now_ms.max(1));
    }

    /// Records why a node was switched (see [`SwitchDecision`]).
    pub fn record_switch(&mut self, decision: SwitchDecision) {
        self.switches.push(decision);
    }

    /// The switches decided since this copy was read (or last taken), oldest first.
    pub fn take_switches(&mut self) -> Vec<SwitchDecision> {
        std::mem::take(&mut self.switches)
    }

    /// Node `i`'s switch is over at `now_ms` (its first byte came, or its request ended):
    /// remembers how long it took, and that its request's work starts only now.
    pub fn end_switch(&mut self, i: usize, now_ms: u64) {
        let since = self.field(i, N_SWITCH_SINCE);
        if since > 0 {
            let took = now_ms.saturating_sub(since).max(1);
            self.set_field(i, N_SWITCH_TOOK, took);
            self.set_field(i, N_SWITCH_SINCE, 0);
            let until = self.field(i, N_BUSY_UNTIL);
            if until > 0 {
                self.set_field(i, N_BUSY_UNTIL, until.saturating_add(took));
            }
        }
    }

    /// Node `i`'s last switch (or request to it of unknown content): the model, whether its
    /// request was streamed, and either `Ok(since)` while under way or `Err(took)` once over.
    pub fn switching(&self, i: usize) -> Option<(u64, bool, Result<u64, u64>)> {
        let (since, took) = (self.field(i, N_SWITCH_SINCE), self.field(i, N_SWITCH_TOOK));
        let stream = self.field(i, N_FLAGS) & F_SWITCH_STREAM != 0;
        let phase = match (since, took) {
            (0, 0) => return None,
            (0, took) => Err(took),
            (since, _) => Ok(since),
        };
        self.warm(i).map(|m| (m, stream, phase))
    }

    /// Node `i` was given a request expected to keep it busy until `until_ms` (not counting a
    /// switch: [`ClusterState::end_switch`] adds what that took); `guessed`: its work was not
    /// known, and `until_ms` counts the prior.
    pub fn expect_busy_until(&mut self, i: usize, until_ms: u64, guessed: bool) {
        self.set_field(i, N_BUSY_UNTIL, until_ms);
        if guessed {
            self.set_flags(i, F_BUSY_GUESSED);
        } else {
            self.clear_flags(i, F_BUSY_GUESSED);
        }
    }

    /// Whether node `i`'s expected end counts the prior ([`ClusterState::expect_busy_until`]).
    pub fn busy_guessed(&self, i: usize) -> bool {
        self.field(i, N_FLAGS) & F_BUSY_GUESSED != 0
    }

    /// What the look-ahead's current plan was made for (a hash of what it looked at; 0: none).
    pub fn plan_key(&self) -> u64 {
        read(&self.bytes, H_PLAN_KEY)
    }

    /// Replaces the look-ahead's plan: `overrides` for the nodes it names, the rule for the rest.
    pub fn set_plan(&mut self, key: u64, overrides: &[(usize, Planned)]) {
        write(&mut self.bytes, H_PLAN_KEY, key);
        for i in 0..self.node_count() {
            self.clear_flags(i, F_PLAN_HOLD | F_PLAN_SERVE);
        }
        for &(i, planned) in overrides {
            match planned {
                Planned::Hold => self.set_flags(i, F_PLAN_HOLD),
                Planned::Serve(model) => {
                    self.set_field(i, N_PLAN, model);
                    self.set_flags(i, F_PLAN_SERVE);
                }
            }
        }
    }

    /// Notes that the look-ahead played its futures for the plan just set.
    pub fn note_looked_ahead(&mut self) {
        self.looked_ahead = true;
    }

    /// Whether the look-ahead made a plan on this copy since it was read (or last asked).
    pub fn take_looked_ahead(&mut self) -> bool {
        std::mem::take(&mut self.looked_ahead)
    }

    /// The look-ahead's plan for node `i`; `None`: the rule decides.
    pub fn planned(&self, i: usize) -> Option<Planned> {
        let flags = self.field(i, N_FLAGS);
        if flags & F_PLAN_HOLD != 0 {
            Some(Planned::Hold)
        } else if flags & F_PLAN_SERVE != 0 {
            Some(Planned::Serve(self.field(i, N_PLAN)))
        } else {
            None
        }
    }

    /// When the last request node `i` was given is expected to end (0: none recorded).
    pub fn busy_until(&self, i: usize) -> u64 {
        self.field(i, N_BUSY_UNTIL)
    }

    pub fn counters(&self, i: usize) -> NodeCounters {
        NodeCounters {
            served: self.field(i, N_SERVED),
            failures: self.field(i, N_FAILURES),
            switches: self.field(i, N_SWITCHES),
        }
    }

    pub fn count_served(&mut self, i: usize) {
        let n = self.field(i, N_SERVED);
        self.set_field(i, N_SERVED, n.saturating_add(1));
    }

    pub fn count_failure(&mut self, i: usize) {
        let n = self.field(i, N_FAILURES);
        self.set_field(i, N_FAILURES, n.saturating_add(1));
    }

    /// When node `i`'s next active check is due (0: now).
    pub fn next_check(&self, i: usize) -> u64 {
        self.field(i, N_NEXT_CHECK)
    }

    pub fn set_next_check(&mut self, i: usize, at_ms: u64) {
        self.set_field(i, N_NEXT_CHECK, at_ms);
    }

    /// When node `i` may next be asked what model it has loaded (0: now; `u64::MAX`: never).
    pub fn next_discovery(&self, i: usize) -> u64 {
        self.field(i, N_NEXT_DISCOVERY)
    }

    pub fn set_next_discovery(&mut self, i: usize, at_ms: u64) {
        self.set_field(i, N_NEXT_DISCOVERY, at_ms);
    }

    /// Node `i`'s asks for what it has loaded that are unanswered (bits of
    /// `discover::Source::bit`; 0: none out).
    pub fn discovery_asks(&self, i: usize) -> u64 {
        (self.field(i, N_FLAGS) & F_DISCOVERY_ASKS) >> DISCOVERY_ASKS_SHIFT
    }

    pub fn set_discovery_asks(&mut self, i: usize, asks: u64) {
        self.clear_flags(i, F_DISCOVERY_ASKS);
        self.set_flags(i, (asks << DISCOVERY_ASKS_SHIFT) & F_DISCOVERY_ASKS);
    }

    /// Whether one of node `i`'s places answered what it has loaded since it was last asked.
    pub fn discovery_answered(&self, i: usize) -> bool {
        self.field(i, N_FLAGS) & F_DISCOVERY_ANSWERED != 0
    }

    pub fn set_discovery_answered(&mut self, i: usize, answered: bool) {
        if answered {
            self.set_flags(i, F_DISCOVERY_ANSWERED);
        } else {
            self.clear_flags(i, F_DISCOVERY_ANSWERED);
        }
    }

    /// Until when node `i` is to be avoided for `model` (it said it is not running it).
    pub fn not_running_until(&self, i: usize, model: u64) -> Option<u64> {
        if self.field(i, N_FLAGS) & F_MARKS == 0 {
            return None;
        }
        (0..NOT_RUNNING_PER_NODE)
            .map(|k| N_NOT_RUNNING + 16 * k)
            .find(|&f| self.field(i, f + 8) != 0 && self.field(i, f) == model)
            .map(|f| self.field(i, f + 8))
    }

    /// The models node `i` is avoided for at `now_ms`.
    pub fn not_running(&self, i: usize, now_ms: u64) -> Vec<u64> {
        (0..NOT_RUNNING_PER_NODE)
            .map(|k| N_NOT_RUNNING + 16 * k)
            .filter(|&f| self.field(i, f + 8) > now_ms)
            .map(|f| self.field(i, f))
            .collect()
    }

    /// Avoids node `i` for `model` until `until_ms` (replacing the entry that ends soonest when
    /// the node's entries are all taken).
    pub fn mark_not_running(&mut self, i: usize, model: u64, until_ms: u64) {
        let entries = (0..NOT_RUNNING_PER_NODE).map(|k| N_NOT_RUNNING + 16 * k);
        let same = entries.clone().find(|&f| self.field(i, f + 8) != 0 && self.field(i, f) == model);
        let slot = same.or_else(|| entries.min_by_key(|&f| self.field(i, f + 8)));
        if let Some(f) = slot {
            self.set_field(i, f, model);
            self.set_field(i, f + 8, until_ms.max(1));
            self.set_flags(i, F_MARKS);
        }
    }

    /// Keeps only the not-running marks of node `i` for which `keep` says so.
    pub fn retain_not_running(&mut self, i: usize, keep: impl Fn(u64) -> bool) {
        for k in 0..NOT_RUNNING_PER_NODE {
            let f = N_NOT_RUNNING + 16 * k;
            if self.field(i, f + 8) != 0 && !keep(self.field(i, f)) {
                self.set_field(i, f, 0);
                self.set_field(i, f + 8, 0);
            }
        }
        if (0..NOT_RUNNING_PER_NODE).all(|k| self.field(i, N_NOT_RUNNING + 16 * k + 8) == 0) {
            self.clear_flags(i, F_MARKS);
        }
    }

    // ---- queue ----

    fn queue_at(&self) -> usize {
        self.matrix_at() + self.node_count() * self.vm_count() * 2
    }

    fn queue_bytes(&self) -> &[u8] {
        self.bytes.get(self.queue_at()..).unwrap_or_default()
    }

    pub fn waiter(&self, k: usize) -> Option<Waiter> {
        if k >= self.queue_len() {
            return None;
        }
        let at = self.queue_at() + k * WAITER_BYTES;
        let r = |f: usize| read(&self.bytes, at + f);
        let grant_word = r(W_GRANT);
        let grant = match grant_word & 0xff {
            G_NODE => Some(Grant::Node {
                node: count(r(W_GRANT_ARG)),
                probing: grant_word & G_PROBING != 0,
                switched: grant_word & G_SWITCHED != 0,
                cold: grant_word & G_COLD != 0,
            }),
            G_UNAVAILABLE => Some(Grant::Unavailable { retry_after_s: r(W_GRANT_ARG) }),
            G_TOO_LATE => Some(Grant::TooLate { start_in_s: r(W_GRANT_ARG) }),
            _ => None,
        };
        Some(Waiter {
            seq: r(W_SEQ),
            vm: r(W_VM),
            ctx: u32::try_from(r(W_CTX)).unwrap_or(u32::MAX),
            model: r(W_MODEL),
            hash_key: (grant_word & G_HAS_HASH_KEY != 0).then(|| r(W_HASH_KEY)),
            stream: grant_word & G_STREAM != 0,
            random: r(W_RANDOM),
            enqueued_ms: r(W_ENQUEUED),
            client: r(W_CLIENT),
            work_ms: r(W_WORK),
            round: r(W_ROUND),
            grant,
        })
    }

    fn encode_waiter(w: &Waiter) -> [u8; WAITER_BYTES] {
        let mut record = [0u8; WAITER_BYTES];
        let (kind, arg, flags) = match w.grant {
            None => (G_NONE, 0, 0),
            Some(Grant::Node { node, probing, switched, cold }) => (
                G_NODE,
                node as u64,
                if probing { G_PROBING } else { 0 }
                    | if switched { G_SWITCHED } else { 0 }
                    | if cold { G_COLD } else { 0 },
            ),
            Some(Grant::Unavailable { retry_after_s }) => (G_UNAVAILABLE, retry_after_s, 0),
            Some(Grant::TooLate { start_in_s }) => (G_TOO_LATE, start_in_s, 0),
        };
        let grant_word =
            kind | flags | if w.hash_key.is_some() { G_HAS_HASH_KEY } else { 0 } | if w.stream { G_STREAM } else { 0 };
        for (f, v) in [
            (W_SEQ, w.seq),
            (W_VM, w.vm),
            (W_CTX, u64::from(w.ctx)),
            (W_MODEL, w.model),
            (W_HASH_KEY, w.hash_key.unwrap_or(0)),
            (W_RANDOM, w.random),
            (W_ENQUEUED, w.enqueued_ms),
            (W_GRANT, grant_word),
            (W_GRANT_ARG, arg),
            (W_CLIENT, w.client),
            (W_WORK, w.work_ms),
            (W_ROUND, w.round),
        ] {
            write(&mut record, f, v);
        }
        record
    }

    pub fn set_waiter(&mut self, k: usize, w: &Waiter) {
        if k < self.queue_len() {
            let at = self.queue_at() + k * WAITER_BYTES;
            if let Some(slot) = self.bytes.get_mut(at..at + WAITER_BYTES) {
                slot.copy_from_slice(&Self::encode_waiter(w));
            }
        }
    }

    pub fn push_waiter(&mut self, w: &Waiter) {
        self.bytes.extend_from_slice(&Self::encode_waiter(w));
        let n = self.queue_len() as u64;
        write(&mut self.bytes, H_QUEUE, n + 1);
    }

    pub fn remove_waiter(&mut self, k: usize) -> Option<Waiter> {
        let w = self.waiter(k)?;
        let at = self.queue_at() + k * WAITER_BYTES;
        if at + WAITER_BYTES > self.bytes.len() {
            return None;
        }
        self.bytes.drain(at..at + WAITER_BYTES);
        let n = self.queue_len() as u64;
        write(&mut self.bytes, H_QUEUE, n.saturating_sub(1));
        Some(w)
    }

    /// The queue position of the request paused in `vm`'s stream `ctx`.
    pub fn find_waiter(&self, vm: u64, ctx: u32) -> Option<usize> {
        (0..self.queue_len()).find(|&k| self.waiter(k).is_some_and(|w| w.vm == vm && w.ctx == ctx))
    }

    /// Keeps the waiters for which `keep` says so, in order.
    pub fn retain_waiters(&mut self, keep: impl Fn(&Waiter) -> bool) {
        let kept: Vec<Waiter> = (0..self.queue_len()).filter_map(|k| self.waiter(k)).filter(|w| keep(w)).collect();
        let at = self.queue_at();
        self.bytes.truncate(at);
        write(&mut self.bytes, H_QUEUE, 0);
        for w in &kept {
            self.push_waiter(w);
        }
    }

    /// Waiters, oldest first.
    pub fn waiters(&self) -> impl Iterator<Item = Waiter> + '_ {
        (0..self.queue_len()).filter_map(|k| self.waiter(k))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(names: &[&str]) -> Layout {
        Layout::new(names.iter().copied())
    }

    fn waiter(seq: u64, vm: u64, ctx: u32) -> Waiter {
        Waiter {
            seq,
            vm,
            ctx,
            model: model_key("m"),
            hash_key: None,
            stream: true,
            random: 0,
            enqueued_ms: 0,
            client: 0,
            work_ms: 0,
            round: 0,
            grant: None,
        }
    }

    #[test]
    fn inflight_sums_live_leases_and_returns_to_zero() {
        let mut s = ClusterState::new(&layout(&["a", "b"]));
        s.acquire(1, 0, 0);
        s.acquire(1, 0, 0);
        s.acquire(2, 0, 0);
        s.acquire(2, 1, 0);
        assert_eq!((s.inflight(0, 1), s.inflight(1, 1)), (3, 1));
        s.release(1, 0);
        s.release(1, 0);
        s.release(1, 0); // one too many: ignored
        s.release(2, 0);
        s.release(2, 1);
        assert_eq!((s.inflight(0, 1), s.inflight(1, 1)), (0, 0));
    }

    #[test]
    fn dead_vm_lease_is_reclaimed() {
        let mut s = ClusterState::new(&layout(&["a"]));
        s.acquire(1, 0, 0);
        s.acquire(2, 0, 0);
        s.update_health(0, |h| h.probe_vm = Some(1));
        // VM 2 keeps ticking, VM 1 died.
        let mut reclaimed = 0;
        for t in (1_000..=LEASE_TTL_MS).step_by(1_000) {
            reclaimed += s.renew_and_prune(2, t);
        }
        assert_eq!(reclaimed, 1);
        assert_eq!(s.inflight(0, LEASE_TTL_MS), 1);
        assert_eq!(s.health(0).probe_vm, None);
        assert!(!s.lease_alive(1, LEASE_TTL_MS));
    }

    #[test]
    fn a_dead_vms_waiters_go_with_its_lease() {
        let mut s = ClusterState::new(&layout(&["a"]));
        s.touch_lease(3, 0);
        s.touch_lease(4, 0);
        s.push_waiter(&waiter(0, 3, 9));
        s.push_waiter(&waiter(1, 4, 2));
        s.renew_and_prune(3, LEASE_TTL_MS);
        assert_eq!(s.waiters().map(|w| w.vm).collect::<Vec<_>>(), vec![3]);
    }

    #[test]
    fn busy_counts_holds_until_they_expire() {
        let mut s = ClusterState::new(&layout(&["a"]));
        s.acquire(1, 0, 0);
        s.add_hold(0, 500);
        assert_eq!(s.busy(0, 100), 2);
        assert_eq!(s.busy(0, 500), 1);
    }

    #[test]
    fn warm_model_switches_are_counted() {
        let mut s = ClusterState::new(&layout(&["a"]));
        assert!(!s.set_warm(0, 1));
        assert!(!s.set_warm(0, 1));
        assert!(s.set_warm(0, 2));
        assert_eq!((s.warm(0), s.counters(0).switches), (Some(2), 1));
    }

    #[test]
    fn a_switch_moves_the_expected_end_of_the_nodes_request_on() {
        let mut s = ClusterState::new(&layout(&["a", "b"]));
        assert_eq!(s.busy_until(0), 0);
        // Granted at 1 s, 10 s of work expected; its switch takes 30 s.
        s.expect_busy_until(0, 11_000, true);
        assert!(s.busy_guessed(0) && !s.busy_guessed(1));
        s.start_switch(0, 1_000, true);
        s.end_switch(0, 31_000);
        assert_eq!((s.busy_until(0), s.busy_until(1)), (41_000, 0));
        // The same switch ending again (the request's end after its first byte) moves nothing.
        s.end_switch(0, 45_000);
        assert_eq!(s.busy_until(0), 41_000);
        let decoded = ClusterState::decode(Some(s.encode()), &layout(&["a", "b"]));
        assert_eq!((decoded.busy_until(0), decoded.busy_guessed(0)), (41_000, true));
        s.expect_busy_until(0, 50_000, false);
        assert!(!s.busy_guessed(0));
    }

    #[test]
    fn queue_records_round_trip_in_order() {
        let mut s = ClusterState::new(&layout(&["a", "b"]));
        s.acquire(7, 1, 0);
        let mut w = waiter(5, 7, 3);
        w.hash_key = Some(99);
        w.grant = Some(Grant::Node { node: 1, probing: true, switched: true, cold: false });
        s.push_waiter(&waiter(4, 7, 2));
        s.push_waiter(&w);
        s.push_waiter(&Waiter { grant: Some(Grant::Unavailable { retry_after_s: 8 }), ..waiter(6, 7, 4) });
        let late = Waiter { grant: Some(Grant::TooLate { start_in_s: 75 }), ..waiter(9, 7, 5) };
        s.push_waiter(&late);
        assert_eq!(s.waiter(3), Some(late));
        s.remove_waiter(3);
        assert_eq!(s.waiter(1), Some(w));
        assert_eq!(s.find_waiter(7, 4), Some(2));
        assert_eq!(s.remove_waiter(0).map(|w| w.seq), Some(4));
        assert_eq!(s.waiters().map(|w| w.seq).collect::<Vec<_>>(), vec![5, 6]);
        // Adding a VM reshapes the in-flight table and keeps everything else.
        s.acquire(8, 0, 0);
        assert_eq!((s.inflight(0, 1), s.inflight(1, 1), s.queue_len()), (1, 1, 2));
        assert_eq!(s.waiter(0), Some(w));
    }

    #[test]
    fn bytes_round_trip_and_garbage_gives_a_fresh_state() {
        let l = layout(&["rk1", "rk2"]);
        let mut s = ClusterState::new(&l);
        s.acquire(7, 0, 5);
        s.update_health(1, |h| h.record_failure(3, 1, 100));
        s.set_rr(0, -2);
        let back = ClusterState::decode(Some(s.encode()), &l);
        assert_eq!(back, s);
        assert_eq!(ClusterState::decode(Some(b"garbage"), &l), ClusterState::new(&l));
        assert_eq!(ClusterState::decode(None, &l), ClusterState::new(&l));
        let mut truncated = s.encode().to_vec();
        truncated.pop();
        assert_eq!(ClusterState::decode(Some(&truncated), &l), ClusterState::new(&l));
    }

    #[test]
    fn a_new_node_list_keeps_the_records_of_nodes_that_stay() {
        let old = layout(&["a", "b", "c"]);
        let mut s = ClusterState::new(&old);
        s.acquire(1, 1, 0);
        s.acquire(1, 2, 0);
        s.set_warm(1, 42);
        s.push_waiter(&Waiter {
            grant: Some(Grant::Node { node: 2, probing: false, switched: false, cold: false }),
            ..waiter(0, 1, 1)
        });
        s.push_waiter(&Waiter {
            grant: Some(Grant::Node { node: 0, probing: false, switched: false, cold: false }),
            ..waiter(1, 1, 2)
        });
        let new = layout(&["c", "b", "d"]);
        let t = ClusterState::decode(Some(s.encode()), &new);
        // VM 1 (the old list) lives: "a" stays, after the new list's own nodes.
        assert_eq!(
            (t.node_count(), t.other_nodes(), t.inflight(0, 1), t.inflight(1, 1), t.inflight(2, 1)),
            (4, 1, 1, 1, 0)
        );
        assert_eq!((t.warm(1), t.warm(0)), (Some(42), None));
        let grants: Vec<_> = t.waiters().map(|w| w.grant).collect();
        let on = |node| Some(Grant::Node { node, probing: false, switched: false, cold: false });
        assert_eq!(grants, vec![on(0), on(3)]);
        // Once VM 1 is gone, so is "a", and a grant to it (none is left to take it).
        let mut t = t;
        t.touch_lease(2, LEASE_TTL_MS);
        t.renew_and_prune(2, LEASE_TTL_MS + 1);
        assert_eq!((t.node_count(), t.other_nodes(), t.queue_len()), (3, 0, 0));
        assert_eq!(t.warm(1), Some(42));
    }

    #[test]
    fn two_node_lists_share_one_state_without_losing_each_others_records() {
        // A reload: VM 1 runs [a, b] (draining a stream on b), VM 2 runs [a, c].
        let (old, new) = (layout(&["a", "b"]), layout(&["a", "c"]));
        let mut s = ClusterState::new(&old);
        s.acquire(1, 1, 0);
        let mut s = ClusterState::decode(Some(s.encode()), &new);
        s.acquire(2, 1, 0);
        s.acquire(2, 0, 0);
        s.push_waiter(&Waiter {
            grant: Some(Grant::Node { node: 1, probing: false, switched: false, cold: false }),
            ..waiter(0, 2, 7)
        });
        assert!(s.same_layout(2) && !s.same_layout(1));
        // The old VM ticks: c's slots and the grant to c survive; b is still busy.
        let mut s = ClusterState::decode(Some(s.encode()), &old);
        s.renew_and_prune(1, 1);
        assert_eq!((s.inflight(0, 1), s.inflight(1, 1), s.inflight(2, 1)), (1, 1, 1), "a, b, then c");
        assert!(s.same_layout(1) && !s.same_layout(2));
        s.release(1, 1);
        // And back in the new VM: a and c busy, the grant still on c.
        let s = ClusterState::decode(Some(s.encode()), &new);
        assert_eq!((s.node_count(), s.inflight(0, 1), s.inflight(1, 1), s.inflight(2, 1)), (3, 1, 1, 0));
        assert_eq!(
            s.waiter(0).and_then(|w| w.grant),
            Some(Grant::Node { node: 1, probing: false, switched: false, cold: false })
        );
    }

    #[test]
    fn size_is_bounded_by_nodes_vms_and_queue() {
        let mut s = ClusterState::new(&layout(&["a", "b", "c"]));
        for vm in 1..=3 {
            s.acquire(vm, 0, 0);
        }
        for k in 0..2 {
            s.push_waiter(&waiter(k, 1, k as u32));
        }
        assert_eq!(s.encode().len(), HEADER_BYTES + 3 * VM_BYTES + 3 * NODE_BYTES + 3 * 3 * 2 + 2 * WAITER_BYTES);
        // Marks for any number of models stay within the node's record.
        for m in 0..1_000 {
            s.mark_not_running(0, m, 10 + m);
        }
        assert_eq!(s.not_running(0, 0).len(), NOT_RUNNING_PER_NODE);
        assert_eq!(s.encode().len(), HEADER_BYTES + 3 * VM_BYTES + 3 * NODE_BYTES + 3 * 3 * 2 + 2 * WAITER_BYTES);
    }
}
