//! The journal side of a shard: a finished tick's records framed as one commit, and the
//! committer task that writes groups of ticks (one O_DIRECT write and one fdatasync per
//! group) and only then answers their requests.

use super::answers::{answer_all, answer_one};
use super::JOURNAL_BLOCK_BYTES;
use super::{internal, micros, red, BatchSlot, IssueFailure, IssueResult, Shard, ShardError};
use crate::journal::Journal;
use crate::metrics::{ShardMetrics, Stage};
use appliance_core::journal::frame::{begin_commit, seal_commit, SealError};
use appliance_core::Answer;
use glommio::channels::local_channel::{LocalReceiver, LocalSender};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::ops::Range;
use std::rc::Rc;
use std::time::Instant;

/// A finished tick on its way to the disk: its records (padded to the block size), its
/// answers, and where they go once the records are durable.
pub(super) struct CommitJob {
    /// One sealed commit (empty if the tick wrote no record).
    pub(super) bytes: Vec<u8>,
    /// Where its records lie in `bytes` (between the commit header and the padding).
    pub(super) records: Range<usize>,
    /// Their sequence numbers.
    pub(super) seqs: Range<u64>,
    pub(super) answers: Vec<Answer>,
    pub(super) slots: Vec<BatchSlot>,
    /// Answers to other shards' red claims, sent once this job is durable.
    pub(super) claim_replies: Vec<red::ClaimReply>,
}

/// The ticks' records as one commit: one header over every record, in order (their
/// sequence numbers run on from tick to tick), one padding.
fn merge_commits(jobs: &[&CommitJob]) -> Result<Vec<u8>, SealError> {
    let records: usize = jobs.iter().map(|job| job.records.len()).sum();
    let mut out = Vec::with_capacity(records + 2 * JOURNAL_BLOCK_BYTES);
    let start = begin_commit(&mut out);
    debug_assert!(jobs.windows(2).all(|w| w[0].seqs.end == w[1].seqs.start));
    for job in jobs {
        out.extend_from_slice(&job.bytes[job.records.clone()]);
    }
    let first_seq = jobs.first().map_or(0, |job| job.seqs.start);
    let last_seq = jobs.last().map_or(0, |job| job.seqs.end) - 1;
    seal_commit(&mut out, start, JOURNAL_BLOCK_BYTES, first_seq, last_seq)?;
    Ok(out)
}

/// Finished ticks queued for the committer while it writes a group. With one, the tick
/// loop blocked on the channel as soon as a second tick was ready behind an fdatasync
/// (0.4-1.2 ms here), so under per-invoice load (tiny ticks) a shard spent its time
/// waiting for the disk. Eight let the tick loop go on issuing for several ticks while a
/// commit is in flight, and the committer then takes them all as its next group (one
/// write, one fdatasync). Beyond eight the tick loop waits: the disk is then the bound,
/// and waiting lets the next ticks grow, which is what amortises the fdatasync. Memory
/// stays bounded: at most this many ticks queued (each at most `tick_requests_max`
/// invoices, about 3.2 MiB at the default 8,192), plus the group being written (at most
/// `commit_bytes_max`, 16 MiB) and the one tick held back from it.
pub(super) const COMMIT_QUEUE_TICKS: usize = 8;
/// Ticks committed together at most: the one the committer waited for plus every tick
/// queued behind it. Groups are also cut at [`COMMIT_GROUP_BYTES_MAX`] (see
/// `commit_loop`).
const COMMIT_GROUP_TICKS_MAX: usize = COMMIT_QUEUE_TICKS + 1;
/// Bytes of sealed ticks merged into one commit at most (a tick larger than this is
/// committed alone). Merging copies the records once more (into a fresh buffer of the
/// group's size): below 1 MiB the copy costs ~0.1 ms against the 0.4-1.2 ms fdatasync it
/// saves, which is the per-invoice case (ticks of a few KiB). Bulk ticks are ~4 MiB each,
/// their write time grows with their size, so merging them saves little, and bulk runs
/// that merged them showed 3-4 % more appliance CPU per invoice (docs/PERFORMANCE.md §14).
const COMMIT_GROUP_BYTES_MAX: usize = 1 << 20;

/// Seals the tick's journal bytes begun at `start` as one commit (header with length,
/// sequence range and payload CRC, padding to the block), or empties them if the tick
/// wrote no record: an empty commit is never written (the commit loop skips empty
/// buffers).
pub(super) fn seal_tick(
    bytes: &mut Vec<u8>,
    start: usize,
    seqs: &std::ops::Range<u64>,
) -> Result<(), appliance_core::journal::frame::SealError> {
    if seqs.is_empty() {
        bytes.truncate(start);
        return Ok(());
    }
    seal_commit(bytes, start, JOURNAL_BLOCK_BYTES, seqs.start, seqs.end - 1).map(|_| ())
}

impl Shard {
    /// An empty tick carrying the queued control records, if any.
    pub(super) fn empty_tick(&mut self) -> Result<Option<CommitJob>, ShardError> {
        if self.issuer.pending_control_records() == 0 && self.red.replies.is_empty() {
            return Ok(None);
        }
        let now = self.clock.now_ms();
        let tick = self
            .issuer
            .begin_tick(now, Vec::new())
            .map_err(|e| internal(self.id, e))?;
        let mut bytes = Vec::with_capacity(JOURNAL_BLOCK_BYTES);
        let start = begin_commit(&mut bytes);
        let commit = self
            .issuer
            .finish_tick(tick, &[], &mut bytes)
            .map_err(|e| internal(self.id, e))?;
        seal_tick(&mut bytes, start, &commit.seqs).map_err(|e| internal(self.id, e))?;
        Ok(Some(CommitJob {
            bytes,
            records: commit.journal_range,
            seqs: commit.seqs,
            answers: commit.answers,
            slots: Vec::new(),
            claim_replies: std::mem::take(&mut self.red.replies),
        }))
    }

    pub(super) async fn send_commit(
        &self,
        commit_tx: &LocalSender<CommitJob>,
        job: CommitJob,
    ) -> Result<(), ShardError> {
        if let Err(e) = commit_tx.send(job).await {
            // The committer stopped after a journal failure; it answered its own jobs,
            // this one is answered here.
            if let glommio::GlommioError::Closed(glommio::ResourceType::Channel(job)) = e {
                answer_all(
                    job.slots,
                    IssueFailure::ShardStopped("journal failed".into()),
                );
            }
            return Err(ShardError::Journal {
                shard: self.id,
                message: "the journal committer stopped".into(),
            });
        }
        Ok(())
    }
}

/// Writes finished ticks, then answers their requests. When the committer is free it
/// takes the tick it waited for and every tick already queued behind it (up to
/// [`COMMIT_GROUP_TICKS_MAX`] ticks and `commit_bytes_max` bytes) as one group: one
/// commit (their records under one header: one O_DIRECT write and one fdatasync for all
/// of them), then the answers of each tick in order. So under
/// load the fdatasync is shared by the ticks that queued up during the previous one.
///
/// After a journal failure it answers every tick of the group still unanswered, and
/// every tick queued, with [`IssueFailure::ShardStopped`] and stops: the shard is
/// fail-stop.
pub(super) async fn commit_loop(
    shard: u32,
    mut journal: Journal,
    jobs: LocalReceiver<CommitJob>,
    metrics: Rc<RefCell<ShardMetrics>>,
) -> Result<(), ShardError> {
    // One group is one commit, so one write, bounded like any commit; the merged commit is
    // never larger than its ticks' sealed commits.
    let group_bytes_max = COMMIT_GROUP_BYTES_MAX.min(journal.config().commit_bytes_max);
    let mut group: VecDeque<CommitJob> = VecDeque::with_capacity(COMMIT_GROUP_TICKS_MAX);
    // A tick taken off the queue that would have made the group too large: it starts the
    // next group.
    let mut carry: Option<CommitJob> = None;
    loop {
        let first = match carry.take() {
            Some(job) => job,
            None => match jobs.recv().await {
                Some(job) => job,
                None => break,
            },
        };
        let mut group_bytes = first.bytes.len();
        group.push_back(first);
        while group.len() < COMMIT_GROUP_TICKS_MAX {
            let Some(job) = try_recv(&jobs).await else {
                break;
            };
            if group_bytes + job.bytes.len() > group_bytes_max {
                carry = Some(job);
                break;
            }
            group_bytes += job.bytes.len();
            group.push_back(job);
        }
        if let Err(error) = commit_group(shard, &mut journal, &mut group, &metrics).await {
            let message = match &error {
                ShardError::Journal { message, .. } => message.clone(),
                other => other.to_string(),
            };
            // Closed explicitly, not dropped: dropping leaves glommio to close the
            // descriptors at a reactor turn that may never come once the shard stops,
            // and the directory lock would outlive the shard (a restart in this process
            // would find the journal locked). Before the answers, so that ticks the
            // tick loop queues meanwhile are drained below.
            if let Err(e) = journal.close().await {
                tracing::warn!(shard, error = %e, "closing the failed journal");
            }
            let failure = IssueFailure::ShardStopped(message);
            for job in group.drain(..).chain(carry.take()) {
                answer_all(job.slots, failure.clone());
            }
            while let Some(job) = try_recv(&jobs).await {
                answer_all(job.slots, failure.clone());
            }
            // Returning drops the receiver: the tick loop's next send fails, it answers
            // that tick itself and stops too.
            return Err(error);
        }
        debug_assert!(group.is_empty());
    }
    journal.close().await.map_err(|e| ShardError::Journal {
        shard,
        message: e.to_string(),
    })
}

/// A tick already queued, without waiting; `None` if there is none. glommio's local
/// channel has no `try_recv`: `recv` is polled once, and dropping it when it is pending
/// takes its waker off the channel again.
async fn try_recv(jobs: &LocalReceiver<CommitJob>) -> Option<CommitJob> {
    futures_lite::future::poll_once(jobs.recv()).await.flatten()
}

/// Makes the ticks of `group` durable with one `Journal::commit`, then answers them
/// in order. Each tick is taken off `group` once answered: on an error, `group` holds
/// exactly the ticks nobody has answered yet.
async fn commit_group(
    shard: u32,
    journal: &mut Journal,
    group: &mut VecDeque<CommitJob>,
    metrics: &RefCell<ShardMetrics>,
) -> Result<(), ShardError> {
    // A tick that wrote no record (only rejections or replays) has nothing to commit, but
    // is still answered in its place: its replays may need records of earlier ticks.
    let sealed: Vec<&CommitJob> = group.iter().filter(|job| !job.bytes.is_empty()).collect();
    if !sealed.is_empty() {
        let start = Instant::now();
        let writes_before = journal.writes_total();
        // Several ticks become ONE commit, not several commits in one write: a power loss
        // may keep any subset of a write's blocks, and recovery drops a torn commit
        // whole, but it refuses a whole commit behind a torn one (data after a hole),
        // which back-to-back commits in one write could leave (docs/journal.md).
        let merged;
        let bytes: &[u8] = match sealed.as_slice() {
            [one] => &one.bytes,
            many => {
                merged = merge_commits(many).map_err(|e| internal(shard, e))?;
                &merged
            }
        };
        if let Err(e) = journal.commit(bytes).await {
            tracing::error!(
                shard,
                ticks = sealed.len(),
                error = %e,
                "journal commit failed; stopping the shard"
            );
            return Err(ShardError::Journal {
                shard,
                message: e.to_string(),
            });
        }
        let latency_us = micros(start.elapsed());
        let mut m = metrics.borrow_mut();
        m.journal_ticks += sealed.len() as u64;
        m.journal_writes += journal.writes_total() - writes_before;
        // The group's commit latency is each of its ticks' commit latency.
        for job in group.iter().filter(|job| !job.bytes.is_empty()) {
            let count: usize = job.slots.iter().map(|s| s.len).sum();
            m.record(Stage::JournalCommit, latency_us, count as u64);
        }
    }
    // Replays need their invoices from the journal: one read per commit holding any of
    // them, for the whole group.
    let replay_seqs: Vec<u64> = group
        .iter()
        .flat_map(|job| job.answers.iter())
        .filter_map(|a| match a {
            Answer::Replay { seq, .. } => Some(*seq),
            _ => None,
        })
        .collect();
    let mut replays = if replay_seqs.is_empty() {
        Vec::new()
    } else {
        journal
            .read_records(&replay_seqs)
            .await
            .map_err(|e| ShardError::Journal {
                shard,
                message: format!("reading records to replay: {e}"),
            })?
    }
    .into_iter();
    while let Some(job) = group.pop_front() {
        let mut answers = job.answers.into_iter();
        let slot_lens: Vec<usize> = job.slots.iter().map(|slot| slot.len).collect();
        let mut results: Vec<Vec<IssueResult>> = Vec::with_capacity(slot_lens.len());
        for len in slot_lens {
            let mut slot_results = Vec::with_capacity(len);
            for answer in answers.by_ref().take(len) {
                let replayed = match answer {
                    Answer::Replay { .. } => replays.next(),
                    _ => None,
                };
                match answer_one(shard, metrics, answer, replayed) {
                    Ok(result) => slot_results.push(result),
                    Err(error) => {
                        // Nothing of this tick was sent yet: it goes back to be answered
                        // as stopped with the rest.
                        group.push_front(CommitJob {
                            bytes: Vec::new(),
                            records: 0..0,
                            seqs: 0..0,
                            answers: Vec::new(),
                            slots: job.slots,
                            claim_replies: Vec::new(),
                        });
                        return Err(error);
                    }
                }
            }
            results.push(slot_results);
        }
        for (slot, results) in job.slots.into_iter().zip(results) {
            metrics.borrow_mut().record(
                Stage::Total,
                micros(slot.enqueued.elapsed()),
                slot.len as u64,
            );
            slot.reply.send(results);
        }
        // Claims granted in this job's records (or refused on the state up to it) are
        // answered once it is durable.
        for (reply, result) in job.claim_replies {
            let _ = reply.send(result);
        }
    }
    Ok(())
}
