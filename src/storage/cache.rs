//! Books kept in memory between group transactions, each with the version of its account row
//! it was read or written at (see `migrations/postgres/0010_account_version.sql`).
//!
//! A group worker takes the books of its commands' accounts out on a [`Lease`] (waiting while
//! another worker of this process has one of them out, as it would wait for the row lock),
//! applies the commands, writes them in one statement that checks each version, and gives the
//! books back trimmed to what a load would return ([`Book::trim_to_loaded`]). A book is only a
//! guess of the stored one: the write's version check is what makes it safe, so a book may be
//! stale (another replica wrote) or missing at any time without harm. Dropping a lease without
//! giving its books back forgets them.
//!
//! Bounded by accounts: two generations of up to half the bound each; a book not used while a
//! whole generation filled is forgotten (about least-recently-used, at O(1) a call).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use crate::domain::book::Book;

/// Books kept by default (`tally serve --db-book-cache`).
pub const BOOK_CACHE: usize = 50_000;

/// A book and its account row's version.
#[derive(Clone, Debug)]
pub struct Cached {
    /// The account row's version the book matches.
    pub version: i64,
    /// The book, trimmed.
    pub book: Book,
}

/// The books, the open holds' accounts, and which accounts are out on a lease.
#[derive(Debug)]
pub struct BookCache {
    inner: Mutex<Inner>,
    returned: tokio::sync::Notify,
    cap: usize,
}

#[derive(Debug, Default)]
struct Inner {
    hot: HashMap<String, Cached>,
    cold: HashMap<String, Cached>,
    /// Open hold → its account, for the books kept (also while out on a lease).
    holds: HashMap<String, String>,
    out: HashSet<String>,
}

impl Inner {
    fn forget_holds(&mut self, book: &Book) {
        for h in book.holds.keys() {
            self.holds.remove(h);
        }
    }

    fn keep(&mut self, id: String, c: Cached, cap: usize) {
        if let Some(old) = self.take(&id) {
            self.forget_holds(&old.book);
        }
        for h in c.book.holds.keys() {
            self.holds.insert(h.clone(), id.clone());
        }
        self.hot.insert(id, c);
        if self.hot.len() >= cap.div_ceil(2) {
            let old = std::mem::replace(&mut self.cold, std::mem::take(&mut self.hot));
            for c in old.values() {
                self.forget_holds(&c.book);
            }
            metrics::counter!("tally_db_book_cache_evictions_total").increment(old.len() as u64);
        }
    }

    fn take(&mut self, id: &str) -> Option<Cached> {
        self.hot.remove(id).or_else(|| self.cold.remove(id))
    }
}

impl BookCache {
    /// A cache of at most `cap` books (0: none are kept).
    #[must_use]
    pub fn new(cap: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            returned: tokio::sync::Notify::new(),
            cap,
        }
    }

    /// Whether books are kept at all.
    #[must_use]
    pub fn enabled(&self) -> bool {
        self.cap > 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock left only maps of guesses behind: keep going.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The accounts of open holds of kept books, in the order asked (one lock for a group).
    #[must_use]
    pub fn hold_accounts(&self, holds: &[&str]) -> Vec<Option<String>> {
        let inner = self.lock();
        holds.iter().map(|h| inner.holds.get(*h).cloned()).collect()
    }

    /// Takes `accounts` out on a lease, with the books kept for them, once none of them is
    /// out on another lease.
    pub async fn lease(&self, accounts: &[&str]) -> Lease<'_> {
        loop {
            let returned = self.returned.notified();
            {
                let mut inner = self.lock();
                if !accounts.iter().any(|a| inner.out.contains(*a)) {
                    let mut lease = Lease {
                        cache: self,
                        out: Vec::with_capacity(accounts.len()),
                        books: HashMap::with_capacity(accounts.len()),
                        kept_holds: Vec::new(),
                    };
                    for a in accounts {
                        if inner.out.insert((*a).to_owned()) {
                            lease.out.push((*a).to_owned());
                            if let Some(c) = inner.take(a) {
                                lease.kept_holds.extend(c.book.holds.keys().cloned());
                                lease.books.insert((*a).to_owned(), c);
                            }
                        }
                    }
                    return lease;
                }
            }
            returned.await;
        }
    }

    /// Keeps a book written outside a lease (by a locked transaction), unless the account is
    /// out on a lease or a newer version is kept.
    pub fn offer(&self, c: Cached) {
        if !self.enabled() {
            return;
        }
        let mut inner = self.lock();
        let id = c.book.account_id.clone();
        if inner.out.contains(&id) {
            return;
        }
        let newer = inner
            .hot
            .get(&id)
            .or_else(|| inner.cold.get(&id))
            .is_some_and(|k| k.version >= c.version);
        if !newer {
            inner.keep(id, c, self.cap);
        }
    }

    /// Books kept now.
    #[must_use]
    pub fn len(&self) -> usize {
        let inner = self.lock();
        inner.hot.len() + inner.cold.len()
    }

    /// Whether no book is kept.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Accounts taken out of a [`BookCache`] by one group worker. Its books go back when it is
/// dropped, those in [`Lease::books`] then: remove a book to forget it.
#[derive(Debug)]
pub struct Lease<'c> {
    cache: &'c BookCache,
    out: Vec<String>,
    /// The books of the accounts out, those that were kept or have been put here since.
    pub books: HashMap<String, Cached>,
    /// Open holds of the books as they were taken, whose index entries go with them.
    kept_holds: Vec<String>,
}

impl Lease<'_> {
    /// Adds `account` to the lease if no other lease has it out; whether it is now out here.
    pub fn try_add(&mut self, account: &str) -> bool {
        if self.out.iter().any(|a| a == account) {
            return true;
        }
        let mut inner = self.cache.lock();
        if !inner.out.insert(account.to_owned()) {
            return false;
        }
        self.out.push(account.to_owned());
        if let Some(c) = inner.take(account) {
            self.kept_holds.extend(c.book.holds.keys().cloned());
            self.books.insert(account.to_owned(), c);
        }
        true
    }

    /// Forgets every book of the lease (a write failed: what they say is unknown).
    pub fn forget(&mut self) {
        self.books.clear();
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        let cap = self.cache.cap;
        {
            let mut inner = self.cache.lock();
            for h in &self.kept_holds {
                inner.holds.remove(h);
            }
            for a in &self.out {
                inner.out.remove(a);
            }
            if cap > 0 {
                for (id, c) in self.books.drain() {
                    inner.keep(id, c, cap);
                }
            }
        }
        self.cache.returned.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::{BookCache, Cached};
    use crate::domain::book::Book;

    fn cached(id: &str, version: i64) -> Cached {
        Cached {
            version,
            book: Book::new(id, "free"),
        }
    }

    #[tokio::test]
    async fn a_lease_waits_for_another_lease_of_the_same_account() {
        let cache = std::sync::Arc::new(BookCache::new(8));
        cache.offer(cached("a", 1));
        let first = cache.lease(&["a", "b"]).await;
        assert_eq!(first.books.len(), 1, "a was kept, b was not");
        let waiter = {
            let cache = std::sync::Arc::clone(&cache);
            tokio::spawn(async move { cache.lease(&["b"]).await.books.len() })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "b is out on the first lease");
        let mut second = cache.lease(&["c"]).await;
        assert!(!second.try_add("a"), "a is out elsewhere");
        assert!(second.try_add("c"));
        drop(first);
        assert_eq!(waiter.await.unwrap(), 0);
        assert_eq!(cache.len(), 1, "a came back");
        // An older version offered does not replace a newer one; a newer one does.
        cache.offer(cached("a", 0));
        let lease = cache.lease(&["a"]).await;
        assert_eq!(lease.books["a"].version, 1);
    }

    #[tokio::test]
    async fn the_cache_keeps_at_most_its_bound_and_forgets_the_holds_of_what_it_drops() {
        let cache = BookCache::new(4);
        for i in 0..10 {
            cache.offer(cached(&format!("acc{i}"), 1));
        }
        assert!(cache.len() <= 4, "{} books kept", cache.len());
        let off = BookCache::new(0);
        off.offer(cached("a", 1));
        assert!(off.is_empty());
    }
}
