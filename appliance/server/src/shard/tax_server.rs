//! The shard's calls to the tax server while it serves: a tick's TaxCodes commands and
//! their per-item results, and requisitions of number segments (refills) from
//! background tasks, applied between ticks.

use super::{internal, micros, Shard, ShardError};
use crate::metrics::Stage;
use appliance_core::pool::RefillRequest;
use appliance_core::taxpayer::IdentityError;
use appliance_core::{
    canonical, InvoiceCode, InvoiceNumber, ItemError, NumberSegment, TaxCodeResult, TaxpayerId,
    Tick,
};
use hsm_driver::proto::{
    Holder, InvoiceBatch, Request, Response, Segment, TaxCodeItem, TaxCodeStatus,
    TAX_CODES_BATCH_MAX,
};
use hsm_driver::route::HsmClient;
use hsm_driver::tcp::HsmError;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// A requisition finished by a background task, applied before the next tick.
pub(super) struct RefillDone {
    seller: TaxpayerId,
    result: Result<NumberSegment, String>,
}

/// How long a tick whose pool ran dry waits for a refill in flight before refusing.
const REFILL_WAIT: Duration = Duration::from_secs(2);

pub(super) fn tax_server_error(shard: u32, e: impl std::fmt::Display) -> ShardError {
    ShardError::TaxServer {
        shard,
        message: e.to_string(),
    }
}

pub(super) fn to_core_segment(segment: &Segment) -> Result<NumberSegment, IdentityError> {
    NumberSegment::new(
        InvoiceCode::new(segment.code)?,
        InvoiceNumber::new(segment.first)?,
        segment.count,
    )
}

impl Shard {
    /// Index of the tax server serving `seller`.
    pub(super) fn route_of(&self, seller: &TaxpayerId) -> usize {
        self.taxpayer_routes.get(seller).copied().unwrap_or(0)
    }

    pub(super) fn apply_refills(&mut self) -> Result<(), ShardError> {
        while let Ok(refill) = self.refills_rx.try_recv() {
            self.apply_refill(refill)?;
        }
        Ok(())
    }

    fn apply_refill(&mut self, refill: RefillDone) -> Result<(), ShardError> {
        self.refills_in_flight -= 1;
        match refill.result {
            Ok(segment) => self.issuer.add_segment(&refill.seller, segment).map_err(|e| {
                tracing::error!(shard = self.id, seller = %refill.seller, error = %e, "granted segment refused by the pool");
                internal(self.id, e)
            }),
            Err(message) => {
                tracing::warn!(shard = self.id, seller = %refill.seller, %message, "requisition failed; will retry");
                self.issuer
                    .refill_failed(&refill.seller)
                    .map_err(|e| internal(self.id, e))
            }
        }
    }

    pub(super) fn spawn_refills(&mut self, requests: &[RefillRequest]) {
        for request in requests {
            let hsm = Rc::clone(&self.hsm[self.route_of(&request.seller)]);
            let done = self.refills_tx.clone();
            let holder = self.holder;
            let seller = request.seller;
            let count = request.count;
            self.refills_in_flight += 1;
            glommio::spawn_local(async move {
                let result = requisition(&hsm, holder, &seller, count)
                    .await
                    .map_err(|e| e.to_string());
                let _ = done.send(RefillDone { seller, result });
            })
            .detach();
        }
    }

    /// Waits for one refill in flight to finish and applies it; false if none is in
    /// flight or none finished within [`REFILL_WAIT`].
    pub(super) async fn wait_for_refill(&mut self) -> Result<bool, ShardError> {
        if self.refills_in_flight == 0 {
            return Ok(false);
        }
        let rx = self.refills_rx.clone();
        let waited =
            glommio::timer::timeout(REFILL_WAIT, async move { Ok(rx.recv_async().await.ok()) })
                .await;
        match waited {
            Ok(Some(refill)) => {
                self.apply_refill(refill)?;
                self.apply_refills()?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Sends the tick's tax-code commands: per tax server, one TaxCodes command per
    /// [`TAX_CODES_BATCH_MAX`] of its items (a tick may be larger than the device's
    /// batch), all in flight at once. The task yields the per-item results in tick
    /// order, or why a command as a whole failed, and records the stage's latency.
    pub(super) fn tax_codes(&self, tick: &Tick) -> CodesTask {
        let start = Instant::now();
        let metrics = Rc::clone(&self.metrics);
        let count = tick.requests().len() as u64;
        let calls = self.tax_code_calls(tick);
        let items = tick.item_count();
        glommio::spawn_local(async move {
            let mut results: Vec<Option<TaxCodeResult>> = vec![None; items];
            let mut failure = None;
            // Every call is awaited, even after a failure: the device may still be
            // working on them, and the tick is only aborted once none is out.
            for (chunk, call) in calls? {
                match call.await {
                    Ok(codes) => {
                        for (&i, result) in chunk.iter().zip(codes) {
                            results[i] = Some(result);
                        }
                    }
                    Err(message) => failure = failure.or(Some(message)),
                }
            }
            metrics
                .borrow_mut()
                .record(Stage::TaxCode, micros(start.elapsed()), count);
            if let Some(message) = failure {
                return Err(message);
            }
            Ok(results
                .into_iter()
                .map(|r| r.expect("every item is in one group"))
                .collect())
        })
    }

    /// The tick's TaxCodes commands, each already running, with the tick positions of
    /// its items.
    fn tax_code_calls(&self, tick: &Tick) -> Result<Vec<(Vec<usize>, CodesTask)>, String> {
        let items: Vec<&[u8]> = tick.canonical_items().collect();
        // Items per tax server, in tick order; with one tax server (the usual case) that
        // is every item, without looking at them.
        let mut groups: Vec<Vec<usize>> = vec![Vec::new(); self.hsm.len()];
        if self.hsm.len() == 1 {
            groups[0] = (0..items.len()).collect();
        } else {
            for (i, item) in items.iter().enumerate() {
                let header = canonical::decode_header(item).map_err(|e| e.to_string())?;
                let seller =
                    TaxpayerId::from_bytes(&header.seller_taxpayer).map_err(|e| e.to_string())?;
                groups[self.route_of(&seller)].push(i);
            }
        }
        let mut calls = Vec::new();
        for (route, positions) in groups.iter().enumerate() {
            for chunk in positions.chunks(TAX_CODES_BATCH_MAX) {
                let bytes = chunk.iter().map(|&i| items[i].len()).sum();
                let mut batch = InvoiceBatch::with_capacity(chunk.len(), bytes);
                batch.set_holder(self.holder);
                for &i in chunk {
                    batch.push(items[i]).map_err(|e| e.to_string())?;
                }
                let hsm = Rc::clone(&self.hsm[route]);
                let expected = chunk.len();
                let call = glommio::spawn_local(async move {
                    let response = hsm
                        .call(&Request::TaxCodes(batch))
                        .await
                        .map_err(|e: HsmError| e.to_string())?;
                    let Response::TaxCodes(items) = response else {
                        return Err("unexpected answer to TaxCodes".to_owned());
                    };
                    if items.len() != expected {
                        return Err(format!("{} tax codes for {expected} invoices", items.len()));
                    }
                    Ok(items.iter().map(item_result).collect::<Vec<_>>())
                });
                calls.push((chunk.to_vec(), call));
            }
        }
        Ok(calls)
    }
}

/// Tax codes on their way: the per-item results in item order, or why a command failed.
pub(super) type CodesTask = glommio::Task<Result<Vec<TaxCodeResult>, String>>;

fn item_result(item: &TaxCodeItem) -> TaxCodeResult {
    match item.status() {
        Some(TaxCodeStatus::Ok) => {
            if item.check_code.iter().all(u8::is_ascii_digit) {
                Ok((item.tax_code, item.check_code))
            } else {
                Err(ItemError::InvalidCheckCode)
            }
        }
        Some(TaxCodeStatus::MalformedInvoice) => Err(ItemError::MalformedInvoice),
        // Not granted at all, or granted to another holder: either way not this shard's.
        Some(TaxCodeStatus::NumberNotGranted | TaxCodeStatus::NotHolder) => {
            Err(ItemError::NumberNotHeld)
        }
        Some(TaxCodeStatus::UnknownTaxpayer) => Err(ItemError::UnknownTaxpayer),
        None => Err(ItemError::Device(item.status)),
    }
}

pub(super) async fn requisition(
    hsm: &HsmClient,
    holder: Holder,
    seller: &TaxpayerId,
    count: u32,
) -> Result<NumberSegment, String> {
    // One id for this requisition and all its retries: a retry after a lost connection
    // gets the same segment from the device. If the appliance crashes instead, the
    // segment is adopted from the device's inventory at restart.
    let request_id: u64 = rand::random();
    let request = Request::Requisition {
        taxpayer: *seller.as_bytes(),
        count,
        holder,
        request_id,
    };
    let mut attempts = 0;
    loop {
        attempts += 1;
        match hsm.call(&request).await {
            Ok(Response::Requisition(segment)) => {
                return to_core_segment(&segment).map_err(|e| e.to_string())
            }
            Ok(_) => return Err("unexpected answer to Requisition".into()),
            Err(e) if e.is_transient() && attempts < 5 => {
                glommio::timer::sleep(Duration::from_millis(20 * attempts)).await;
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}
