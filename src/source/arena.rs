//! Where the consumer keeps the bytes of the messages it takes.
//!
//! librdkafka's message buffers belong to librdkafka and are released when
//! the message is, so weir copies each message out. Copying each payload,
//! key and header value into an allocation of its own cost several
//! allocations per message on the consumer thread, each freed later on a
//! writer thread (a cross-thread free). [`Arena`] copies them instead into
//! a shared block of [`Arena::BLOCK`] bytes and hands out `Bytes` views of
//! it: one allocation per block. A full block is retired, and reused once
//! all its views are dropped (its batch committed): weir returns freed
//! memory to the system at once (see `main.rs`), so a fresh block for every
//! 64 KiB of messages meant faulting in and zeroing its pages every time
//! (page faults were a fifth of weir's CPU samples in a backlog; these
//! blocks, a fifth of those). The blocks kept are bounded by the in-flight
//! budget, which bounds the bytes in flight that they hold.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::event::Headers;

/// Copies of message bytes, packed into shared blocks.
#[derive(Debug, Default)]
pub struct Arena {
    block: BytesMut,
    /// Whether `block` is a standard block (not one sized for a big
    /// message), and so worth retiring for reuse.
    standard: bool,
    /// Full standard blocks, oldest first, each reused once nothing views
    /// it any more. At most `keep` of them.
    retired: VecDeque<BytesMut>,
    keep: usize,
    /// Topic names seen, shared. A consumer meets a handful, so a scan of
    /// a short list beats hashing each name.
    names: Vec<Arc<str>>,
    /// Where a message's headers are packed before their one copy.
    scratch: Vec<u8>,
}

impl Arena {
    /// Size of a block. A message larger than this gets a block of its own
    /// size. A block stays allocated while any view into it lives, so a
    /// straggler holds at most this much beyond its own bytes.
    pub const BLOCK: usize = 64 * 1024;

    /// Distinct names shared rather than copied for every message; names
    /// beyond these (a cluster of many topics) are copied.
    const MAX_NAMES: usize = 32;

    /// Retired blocks tried for reuse before a fresh one is allocated. The
    /// oldest is the likeliest to be free; one still viewed (a slow lane's)
    /// goes to the back, so it does not keep the others from reuse.
    const TRIES: usize = 2;

    /// An arena keeping up to `keep_bytes` of full blocks for reuse: the
    /// in-flight budget, which bounds what their views can hold.
    pub fn new(keep_bytes: usize) -> Self {
        Arena {
            keep: keep_bytes / Self::BLOCK,
            ..Arena::default()
        }
    }

    /// A copy of `bytes`, as a view into the current block.
    pub fn copy(&mut self, bytes: &[u8]) -> Bytes {
        if bytes.is_empty() {
            return Bytes::new();
        }
        if self.block.capacity() - self.block.len() < bytes.len() {
            self.next_block(bytes.len());
        }
        self.block.extend_from_slice(bytes);
        self.block.split().freeze()
    }

    /// Makes room for `len` more bytes: the current block again when
    /// nothing views it any more, else a retired one no one views, else a
    /// fresh one.
    fn next_block(&mut self, len: usize) {
        let size = len.max(Self::BLOCK);
        // `try_reclaim` succeeds only when this handle is the last one on
        // its allocation (every view dropped): reuse never overwrites bytes
        // a batch still holds.
        if self.block.try_reclaim(size) {
            return;
        }
        let reused = if size == Self::BLOCK {
            self.reclaim_retired()
        } else {
            None
        };
        let full = std::mem::replace(
            &mut self.block,
            reused.unwrap_or_else(|| BytesMut::with_capacity(size)),
        );
        if self.standard && self.keep > 0 {
            if self.retired.len() == self.keep {
                // Dropping the handle frees the block once its views go.
                self.retired.pop_front();
            }
            self.retired.push_back(full);
        }
        self.standard = size == Self::BLOCK;
    }

    fn reclaim_retired(&mut self) -> Option<BytesMut> {
        for _ in 0..Self::TRIES.min(self.retired.len()) {
            let mut block = self.retired.pop_front()?;
            if block.try_reclaim(Self::BLOCK) {
                return Some(block);
            }
            self.retired.push_back(block);
        }
        None
    }

    /// A message's headers, packed and copied into the current block as one
    /// view (see [`Headers`]).
    pub fn headers<'a>(
        &mut self,
        pairs: impl IntoIterator<Item = (&'a [u8], Option<&'a [u8]>)>,
    ) -> Headers {
        let mut scratch = std::mem::take(&mut self.scratch);
        let headers = Headers::pack(pairs, &mut scratch, |packed| self.copy(packed));
        self.scratch = scratch;
        headers
    }

    /// A topic name, shared between the messages that carry it.
    pub fn name(&mut self, name: &str) -> Arc<str> {
        if let Some(shared) = self.names.iter().find(|known| ***known == *name) {
            return shared.clone();
        }
        let shared: Arc<str> = Arc::from(name);
        if self.names.len() < Self::MAX_NAMES {
            self.names.push(shared.clone());
        }
        shared
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_are_faithful_and_share_blocks() {
        let mut arena = Arena::default();
        let a = arena.copy(b"first payload");
        let b = arena.copy(b"second");
        assert_eq!(&a[..], b"first payload");
        assert_eq!(&b[..], b"second");
        assert!(arena.copy(b"").is_empty());
        // A message's headers go into the block too, as one view.
        let headers = arena.headers([
            (&b"company_id"[..], Some(&b"c1"[..])),
            (&b"trace"[..], None),
        ]);
        assert_eq!(headers.get("company_id"), Some(&b"c1"[..]));
        assert_eq!(headers.len(), 2);
        assert!(arena.headers([]).is_empty());
        // Consecutive copies lie side by side in one block.
        assert_eq!(a.as_ptr() as usize + a.len(), b.as_ptr() as usize);

        // A message bigger than a block gets a block of its own, whole.
        let big = vec![7u8; Arena::BLOCK * 2 + 1];
        let copied = arena.copy(&big);
        assert_eq!(&copied[..], &big[..]);
        // Earlier views are untouched by the new block.
        assert_eq!(&a[..], b"first payload");
    }

    #[test]
    fn a_block_no_one_views_is_reused_and_one_still_viewed_is_not() {
        let mut arena = Arena::default();
        let first = arena.copy(&[1u8; 1000]);
        let start = first.as_ptr();
        let fill = arena.copy(&vec![2u8; Arena::BLOCK - 1000]);
        drop(fill);
        // `first` still views the block: the next copy needs a fresh one,
        // and `first` keeps its bytes.
        let second = arena.copy(&[3u8; 10]);
        assert_ne!(second.as_ptr(), start);
        assert!(first.iter().all(|b| *b == 1));

        // Once nothing views the second block, it is reused from its start.
        let second_start = second.as_ptr();
        let rest = arena.copy(&vec![4u8; Arena::BLOCK - 10]);
        drop((second, rest));
        let third = arena.copy(&[5u8; 100]);
        assert_eq!(third.as_ptr(), second_start);
        assert!(third.iter().all(|b| *b == 5));
    }

    #[test]
    fn full_blocks_are_reused_once_no_one_views_them_and_kept_within_the_budget() {
        let mut arena = Arena::new(4 * Arena::BLOCK);
        // Three full blocks; views of each are held.
        let first = arena.copy(&vec![1u8; Arena::BLOCK]);
        let second = arena.copy(&vec![2u8; Arena::BLOCK]);
        let third = arena.copy(&vec![3u8; Arena::BLOCK]);
        let first_block = first.as_ptr();

        // Every full block is still viewed: a copy needs a fresh block.
        let fresh = arena.copy(&[9u8; 10]);
        assert!(![first.as_ptr(), second.as_ptr(), third.as_ptr()].contains(&fresh.as_ptr()));
        let _rest = arena.copy(&vec![9u8; Arena::BLOCK - 10]);

        // Once the first block's batch is gone, that block is reused, from
        // its start, and the blocks still viewed keep their bytes.
        drop(first);
        let reused = arena.copy(&[4u8; 100]);
        assert_eq!(reused.as_ptr(), first_block);
        assert!(reused.iter().all(|b| *b == 4));
        assert!(second.iter().all(|b| *b == 2));
        assert!(third.iter().all(|b| *b == 3));

        // However many blocks stay viewed, at most the budget's worth are
        // kept for reuse.
        let held: Vec<Bytes> = (0..10)
            .map(|_| arena.copy(&vec![5u8; Arena::BLOCK]))
            .collect();
        assert_eq!(arena.retired.len(), 4);
        assert!(held.iter().all(|view| view.iter().all(|b| *b == 5)));

        // A big message gets a block of its own, never kept.
        let mut arena = Arena::new(4 * Arena::BLOCK);
        let big = arena.copy(&vec![6u8; Arena::BLOCK * 3]);
        let _after = arena.copy(&[7u8; 10]);
        assert!(arena.retired.is_empty());
        assert!(big.iter().all(|b| *b == 6));
    }

    #[test]
    fn header_names_are_shared_up_to_a_bound() {
        let mut arena = Arena::default();
        let a = arena.name("company_id");
        let b = arena.name("company_id");
        assert!(Arc::ptr_eq(&a, &b));
        for i in 0..Arena::MAX_NAMES * 2 {
            assert_eq!(&*arena.name(&format!("n{i}")), format!("n{i}"));
        }
        assert_eq!(arena.names.len(), Arena::MAX_NAMES);
    }
}
