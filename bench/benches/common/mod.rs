//! Inputs shared by the benchmarks: the synthetic railway ticket the demo issues, as a
//! request, an issued invoice and canonical bytes.
// Each bench target compiles this module on its own and uses only part of it.
#![allow(dead_code)]

// The appliance and the emulator binaries run on mimalloc; the core allocates per invoice
// (request clones, answers), so measuring it on glibc malloc would misstate its cost.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use appliance_core::{Invoice, InvoiceCode, InvoiceNumber, IssueRequest, TaxpayerId};
use appliance_server::workload::{invoice_code, seller, ticket_request};

/// The seller every benchmark issues for (the demo's first railway bureau).
pub fn bench_seller() -> TaxpayerId {
    seller(0)
}

/// The demo's invoice code of the bench seller.
pub fn bench_code() -> InvoiceCode {
    InvoiceCode::new(invoice_code(0)).expect("the demo's codes are valid")
}

/// Trip `n` of the bench seller: a typical one-line ticket request.
pub fn request(n: u64) -> IssueRequest {
    ticket_request(bench_seller(), "B", n)
}

/// A typical issued ticket invoice, with fixed fake codes (the codes do not change any
/// byte count or code path of encoding).
pub fn issued_invoice(n: u64) -> Invoice {
    Invoice {
        request: request(n),
        code: bench_code(),
        number: InvoiceNumber::new(1 + (n % 90_000_000) as u32).expect("in range"),
        issue_time_ms: 1_790_000_000_000,
        tax_control_code: [0xA5; 32],
        check_code: *b"01234567890123456789",
    }
}
