//! Where the consumer keeps the bytes of the messages it takes.
//!
//! librdkafka's message buffers belong to librdkafka and are released when
//! the message is, so weir copies each message out. Copying each payload,
//! key and header value into an allocation of its own cost several
//! allocations per message on the consumer thread, each freed later on a
//! writer thread (a cross-thread free). [`Arena`] copies them instead into
//! a shared block of [`Arena::BLOCK`] bytes and hands out `Bytes` views of
//! it: one allocation per block, and a block whose views are all dropped
//! (its batch committed) is reused in place.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};

/// Copies of message bytes, packed into shared blocks.
#[derive(Debug, Default)]
pub struct Arena {
    block: BytesMut,
    /// Topic and header names seen, shared. A consumer meets a handful, so
    /// a scan of a short list beats hashing each name.
    names: Vec<Arc<str>>,
}

impl Arena {
    /// Size of a block. A message larger than this gets a block of its own
    /// size. A block stays allocated while any view into it lives, so a
    /// straggler holds at most this much beyond its own bytes.
    pub const BLOCK: usize = 64 * 1024;

    /// Distinct names shared rather than copied for every message; names
    /// beyond these (a producer inventing header names) are copied.
    const MAX_NAMES: usize = 32;

    /// A copy of `bytes`, as a view into the current block.
    pub fn copy(&mut self, bytes: &[u8]) -> Bytes {
        if bytes.is_empty() {
            return Bytes::new();
        }
        if self.block.capacity() - self.block.len() < bytes.len() {
            // Reuses the current block in place when nothing views it any
            // more (`BytesMut::reserve` reclaims a buffer no other handle
            // shares), and allocates a fresh one otherwise.
            self.block.reserve(bytes.len().max(Self::BLOCK));
        }
        self.block.extend_from_slice(bytes);
        self.block.split().freeze()
    }

    /// A topic or header name, shared between the messages that carry it.
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
