//! tc clsact ingress of an instance's host-side veth: what the container sends.

use aya_ebpf::{macros::classifier, programs::TcContext};

/// Drops packets to a berth network that is neither the instance's nor linked to it; counts tx.
#[classifier]
pub fn berth_tc_ingress(ctx: TcContext) -> i32 {
    crate::tc::handle(&ctx, true)
}
