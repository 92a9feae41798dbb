//! Counts of things in flight by the uid that asked for them, bounded for one uid other than
//! root's and for everyone: what file-system trips for client paths (caller) and operations
//! (operation) are both held to.
//!
//! Owns: the counting and which bound one more would pass. Does not own: the bounds, the
//! errors a refusal becomes, or when a count is given back (each caller's guard).

use std::collections::HashMap;

/// Which bound one more would pass, with the count that reached it.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Full {
    /// The uid's own.
    Uid(usize),
    /// Everyone's.
    Total(usize),
}

#[derive(Debug, Default)]
pub(super) struct UidCounts {
    total: usize,
    by_uid: HashMap<u32, usize>,
}

impl UidCounts {
    /// Counts one more for `uid` unless that passes `per_uid` (not for root) or `total`.
    pub(super) fn add(&mut self, uid: u32, per_uid: usize, total: usize) -> Result<(), Full> {
        let theirs = self.by_uid.get(&uid).copied().unwrap_or(0);
        if uid != 0 && theirs >= per_uid {
            return Err(Full::Uid(theirs));
        }
        if self.total >= total {
            return Err(Full::Total(self.total));
        }
        self.total += 1;
        *self.by_uid.entry(uid).or_default() += 1;
        Ok(())
    }

    /// Gives back one of `uid`'s; a uid with none left leaves the map.
    pub(super) fn remove(&mut self, uid: u32) {
        self.total -= 1;
        if let Some(theirs) = self.by_uid.get_mut(&uid) {
            *theirs -= 1;
            if *theirs == 0 {
                self.by_uid.remove(&uid);
            }
        }
    }

    #[cfg(test)]
    pub(super) fn of(&self, uid: u32) -> usize {
        self.by_uid.get(&uid).copied().unwrap_or(0)
    }
}
