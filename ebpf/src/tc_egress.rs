//! tc clsact egress of an instance's host-side veth: what the container receives.

use aya_ebpf::{macros::classifier, programs::TcContext};

/// Drops packets from a berth network that is neither the instance's nor linked to it; counts rx.
#[classifier]
pub fn berth_tc_egress(ctx: TcContext) -> i32 {
    crate::tc::handle(&ctx, false)
}
