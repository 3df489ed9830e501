//! `IFACES` and `COUNTERS`, and the tc filters on instance veths.
//!
//! Filters are attached through netlink (legacy tc, `clsact` qdisc) rather than TCX links: a
//! netlink filter belongs to the interface, so it outlives the agent process and goes away with
//! the veth.

use aya::maps::{MapError, PerCpuValues};
use aya::programs::tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle};
use aya::programs::TcAttachType;
use berth_ebpf_common::{
    Counters, IfaceValue, COUNTERS_MAP, IFACES_MAP, TC_EGRESS_PROG, TC_INGRESS_PROG,
};
use tracing::{debug, info, instrument};

use super::{sys, tc_program, DataPlane, EbpfError};

/// tc priority of berth's filters (fixed, so a later agent process can find and replace them).
pub const TC_PRIORITY: u16 = 0x4200;
/// tc handle of berth's filters.
pub const TC_HANDLE: TcHandle = TcHandle::new(0, 1);

const DIRECTIONS: [(&str, TcAttachType); 2] = [
    (TC_INGRESS_PROG, TcAttachType::Ingress),
    (TC_EGRESS_PROG, TcAttachType::Egress),
];

fn not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

impl DataPlane {
    /// Puts the policy and counting filters on the host-side veth `ifname` of an instance of
    /// network `network_id`; returns its ifindex. Idempotent: filters left by an earlier agent
    /// process are replaced in place, counters are kept.
    #[instrument(skip(self), fields(node_id = %self.node_id))]
    pub fn attach_iface(&mut self, ifname: &str, network_id: u32) -> Result<u32, EbpfError> {
        let ifindex = sys::if_index(ifname)?;
        // The maps first, so the first packet through the filter is judged and counted right.
        self.ifaces
            .insert(
                ifindex,
                IfaceValue {
                    network_id,
                    flags: 0,
                },
                0,
            )
            .map_err(|source| EbpfError::map(IFACES_MAP, "insert", source))?;
        match self.counters.get(&ifindex, 0) {
            Ok(_) => {}
            Err(e) if not_found(&e) => {
                let cpus = aya::util::nr_cpus().map_err(|(path, source)| EbpfError::Io {
                    op: "read",
                    path: path.into(),
                    source,
                })?;
                let zeros =
                    PerCpuValues::try_from(vec![Counters::default(); cpus]).map_err(|source| {
                        EbpfError::Iface {
                            iface: ifname.to_owned(),
                            source,
                        }
                    })?;
                self.counters
                    .insert(ifindex, zeros, 0)
                    .map_err(|source| EbpfError::map(COUNTERS_MAP, "insert", source))?;
            }
            Err(source) => return Err(EbpfError::map(COUNTERS_MAP, "lookup", source)),
        }
        // Fails when the qdisc exists already, which is what we want.
        if let Err(e) = tc::qdisc_add_clsact(ifname) {
            debug!(ifname, error = %e, "clsact qdisc not added (exists?)");
        }
        for (program, attach_type) in DIRECTIONS {
            let prog = tc_program(&mut self.bpf, program)?;
            let options = TcAttachOptions::Netlink(NlOptions {
                priority: TC_PRIORITY,
                handle: TC_HANDLE,
                classid: None,
            });
            let link_id = match prog.attach_with_options(ifname, attach_type, options) {
                Ok(id) => id,
                Err(create) => {
                    // A filter is there already (earlier agent process): replace its program.
                    let existing = SchedClassifierLink::attached(
                        ifname,
                        attach_type,
                        TC_PRIORITY,
                        TC_HANDLE,
                        None,
                    )
                    .map_err(|source| EbpfError::Iface {
                        iface: ifname.to_owned(),
                        source,
                    })?;
                    prog.attach_to_link(existing).map_err(|replace| {
                        debug!(ifname, program, %create, "tc create failed, replace failed too");
                        EbpfError::Tc {
                            iface: ifname.to_owned(),
                            program,
                            source: Box::new(replace),
                        }
                    })?
                }
            };
            let link = prog.take_link(link_id).map_err(|source| EbpfError::Tc {
                iface: ifname.to_owned(),
                program,
                source: Box::new(source),
            })?;
            // Dropping the link would delete the filter: it belongs to the interface instead,
            // and `detach_iface` removes it by priority and handle.
            std::mem::forget(link);
        }
        info!(ifname, ifindex, network_id, "tc filters attached");
        Ok(ifindex)
    }

    /// Removes the filters of `ifindex` (if the interface still exists) and its `IFACES` and
    /// `COUNTERS` entries.
    #[instrument(skip(self), fields(node_id = %self.node_id))]
    pub fn detach_iface(&mut self, ifindex: u32) -> Result<(), EbpfError> {
        if let Some(ifname) = sys::if_name(ifindex) {
            for (program, attach_type) in DIRECTIONS {
                let link = SchedClassifierLink::attached(
                    &ifname,
                    attach_type,
                    TC_PRIORITY,
                    TC_HANDLE,
                    None,
                )
                .map_err(|source| EbpfError::Iface {
                    iface: ifname.clone(),
                    source,
                })?;
                use aya::programs::Link as _;
                if let Err(e) = link.detach() {
                    // Typically: no such filter (never attached, or removed by hand).
                    debug!(%ifname, program, error = %e, "tc filter not removed");
                }
            }
        }
        for (map, result) in [
            (IFACES_MAP, self.ifaces.remove(&ifindex)),
            (COUNTERS_MAP, self.counters.remove(&ifindex)),
        ] {
            match result {
                Ok(()) => {}
                Err(e) if not_found(&e) => {}
                Err(source) => return Err(EbpfError::map(map, "remove", source)),
            }
        }
        info!(ifindex, "tc filters detached");
        Ok(())
    }

    /// Packets and bytes of the instance behind `ifindex`, summed over CPUs (tx = sent by the
    /// container).
    pub fn counters(&self, ifindex: u32) -> Result<Counters, EbpfError> {
        match self.counters.get(&ifindex, 0) {
            Ok(values) => Ok(values.iter().fold(Counters::default(), |a, c| a.add(*c))),
            Err(e) if not_found(&e) => Err(EbpfError::NotAttached { ifindex }),
            Err(source) => Err(EbpfError::map(COUNTERS_MAP, "lookup", source)),
        }
    }

    /// Interfaces with an `IFACES` entry and their network ids.
    pub fn ifaces(&self) -> Result<Vec<(u32, u32)>, EbpfError> {
        let mut out = Vec::new();
        for entry in self.ifaces.iter() {
            match entry {
                Ok((ifindex, v)) => out.push((ifindex, v.network_id)),
                Err(e) if not_found(&e) => {}
                Err(source) => return Err(EbpfError::map(IFACES_MAP, "iterate", source)),
            }
        }
        Ok(out)
    }
}
