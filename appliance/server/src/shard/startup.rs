//! Start-up, before the shard serves: journal recovery, the tax-server clients,
//! adoption of segments granted to this shard and reconciliation with the tax server's
//! coded marks, pool filling, and the commit that makes all of it durable.

use super::tax_server::{requisition, tax_server_error, to_core_segment};
use super::{internal, red, Shard, ShardClock, ShardConfig, ShardError};
use crate::journal::{Journal, OpenError};
use crate::metrics::ShardMetrics;
use appliance_core::journal::replay::{Recovery, RecoveryError};
use appliance_core::{InvoiceCode, TaxpayerId};
use hsm_driver::proto::{Holder, InventoryScope, Request, Response};
use hsm_driver::route::HsmClient;
use std::cell::RefCell;
use std::rc::Rc;

pub(super) async fn start(config: &ShardConfig) -> Result<(Shard, Journal), ShardError> {
    let id = config.issuer.shard_id;
    let mut recovery = Recovery::new(config.issuer.clone()).map_err(|e| ShardError::Config {
        shard: id,
        message: e.to_string(),
    })?;
    let mut journal = Journal::open(config.journal.clone(), |record| recovery.apply(&record))
        .await
        .map_err(|e: OpenError<RecoveryError>| ShardError::Journal {
            shard: id,
            message: e.to_string(),
        })?;
    let mut clock = ShardClock { last_ms: 0 };
    let issuer = recovery.finish(clock.now_ms());
    if issuer.next_seq() != journal.next_seq() {
        return Err(ShardError::Journal {
            shard: id,
            message: format!(
                "recovered issuer expects sequence {} but the journal continues at {}",
                issuer.next_seq(),
                journal.next_seq()
            ),
        });
    }
    if config.tax_servers.is_empty()
        || config
            .taxpayer_routes
            .values()
            .any(|&i| i >= config.tax_servers.len())
    {
        return Err(ShardError::Config {
            shard: id,
            message: "a taxpayer route names no configured tax server".into(),
        });
    }
    let mut hsm = Vec::with_capacity(config.tax_servers.len());
    for route in &config.tax_servers {
        let client = HsmClient::connect(route, config.hsm)
            .await
            .map_err(|e| tax_server_error(id, format!("{route}: {e}")))?;
        hsm.push(Rc::new(client));
    }
    let (refills_tx, refills_rx) = flume::unbounded();
    let mut shard = Shard {
        id,
        holder: Holder::new(config.appliance_id, id),
        issuer,
        hsm,
        taxpayer_routes: config.taxpayer_routes.clone(),
        clock,
        metrics: Rc::new(RefCell::new(ShardMetrics::new(id))),
        refills_tx,
        refills_rx,
        refills_in_flight: 0,
        red: red::RedShell::default(),
    };
    // Adopted segments count as available at once, so `fill_pools` only asks for what is
    // still missing; one commit then makes every reservation durable before serving.
    // Reconciliation with the device's coded marks spoils, before anything is issued,
    // every number the device coded but the journal does not hold.
    shard.adopt_and_reconcile(config, &mut journal).await?;
    shard.fill_pools(config).await?;
    shard.commit_control_records(&mut journal).await?;
    Ok((shard, journal))
}

impl Shard {
    /// Start-up, before any tick: asks every tax server for the segments granted to this
    /// holder (appliance id, shard) only, then
    /// - adopts those the journal does not know (a crash between the grant and the journal
    ///   commit of its reservation), which keeps every granted number accounted for;
    /// - spoils every number below a segment's coded mark that the journal holds no invoice
    ///   for (a crash between the tax codes and the commit, or a damaged last commit
    ///   dropped at recovery), so that no number the device coded is ever coded again for
    ///   another invoice. The spoiled records are committed before serving.
    ///
    /// Another appliance's segments (another appliance id, e.g. this host's previous data
    /// dir, or a second site on the same tax server) are never listed, so never adopted.
    async fn adopt_and_reconcile(
        &mut self,
        config: &ShardConfig,
        journal: &mut Journal,
    ) -> Result<(), ShardError> {
        let mut inventories = Vec::with_capacity(self.hsm.len());
        for hsm in &self.hsm {
            let response = hsm
                .call(&Request::Inventory(InventoryScope::Holder(self.holder)))
                .await
                .map_err(|e| tax_server_error(self.id, e))?;
            let Response::Inventory(inventory) = response else {
                return Err(tax_server_error(self.id, "unexpected answer to Inventory"));
            };
            inventories.push(inventory);
        }
        for seller_config in &config.issuer.taxpayers {
            let seller = seller_config.id;
            let route = self.route_of(&seller);
            let Some(inventory) = inventories[route]
                .iter()
                .find(|i| &i.taxpayer == seller.as_bytes())
            else {
                return Err(tax_server_error(
                    self.id,
                    format!(
                        "tax server {} does not serve {seller}",
                        config.tax_servers[route]
                    ),
                ));
            };
            for held in &inventory.segments {
                if held.holder != self.holder {
                    return Err(tax_server_error(
                        self.id,
                        format!(
                            "tax server listed a segment of holder {} when asked for {}'s",
                            held.holder, self.holder
                        ),
                    ));
                }
                let segment =
                    to_core_segment(&held.segment).map_err(|e| tax_server_error(self.id, e))?;
                let adopted = self
                    .issuer
                    .adopt_granted(&seller, segment)
                    .map_err(|e| tax_server_error(self.id, e))?;
                if adopted {
                    tracing::warn!(shard = self.id, holder = %self.holder, %seller, ?segment, "adopted a segment granted to this appliance's shard but not journaled");
                }
            }
            for held in &inventory.segments {
                self.spoil_coded(&seller, held, journal).await?;
            }
        }
        Ok(())
    }

    /// Spoils the numbers of `held` below its coded mark that the journal lacks,
    /// committing as often as the control queue fills.
    async fn spoil_coded(
        &mut self,
        seller: &TaxpayerId,
        held: &hsm_driver::proto::HeldSegment,
        journal: &mut Journal,
    ) -> Result<(), ShardError> {
        if held.coded_end <= held.segment.first {
            return Ok(());
        }
        let code = InvoiceCode::new(held.segment.code).map_err(|e| tax_server_error(self.id, e))?;
        let mut total = 0u64;
        loop {
            let (spoiled, left) = self
                .issuer
                .spoil_coded(seller, code, held.coded_end)
                .map_err(|e| internal(self.id, e))?;
            total += u64::from(spoiled);
            if spoiled == 0 || left == 0 {
                break;
            }
            self.commit_control_records(journal).await?;
        }
        if total > 0 {
            // A warning: the ticks in flight at a kill end here every time; a dropped
            // damaged commit was already reported at error level by the journal.
            tracing::warn!(
                shard = self.id,
                %seller,
                code = held.segment.code,
                coded_end = held.coded_end,
                spoiled = total,
                "the tax server coded numbers the journal holds no invoice for; spoiled them so none is coded again (a kill mid-tick, or a tail the journal's recovery dropped)"
            );
            self.metrics.borrow_mut().spoiled_at_start += total;
        }
        Ok(())
    }

    /// Requisitions synchronously until every seller's pool is above its low watermark,
    /// so that the first requests do not find an empty pool.
    async fn fill_pools(&mut self, config: &ShardConfig) -> Result<(), ShardError> {
        for seller_config in &config.issuer.taxpayers {
            let seller = seller_config.id;
            let available = self
                .issuer
                .accounting(&seller)
                .map(|a| a.available)
                .unwrap_or(0);
            if available < u64::from(seller_config.low_watermark) || available == 0 {
                let hsm = &self.hsm[self.route_of(&seller)];
                let segment = requisition(hsm, self.holder, &seller, seller_config.refill_count)
                    .await
                    .map_err(|e| tax_server_error(self.id, e))?;
                self.issuer
                    .add_segment(&seller, segment)
                    .map_err(|e| tax_server_error(self.id, e))?;
            }
        }
        Ok(())
    }

    /// Start-up only: makes queued control records (segment reservations) durable with
    /// an empty tick, before the committer owns the journal.
    async fn commit_control_records(&mut self, journal: &mut Journal) -> Result<(), ShardError> {
        let Some(job) = self.empty_tick()? else {
            return Ok(());
        };
        journal
            .commit(&job.bytes)
            .await
            .map_err(|e| ShardError::Journal {
                shard: self.id,
                message: e.to_string(),
            })?;
        Ok(())
    }
}
