//! Which parts of a document a mapping reads, so that
//! [`Json::parse_wanted`](super::Json::parse_wanted) builds only those.
//!
//! A webhook body is read for a few dozen values: the explode paths, the
//! members the columns name, and the items a `jsonb` column stores whole,
//! which it takes as the event's own text. Building every other member
//! (the envelope's ids, a status's pricing, a message's context) and
//! dropping it again was most of the cost of reading the JSON. Parts that
//! are not wanted are still read through, so what is accepted and refused
//! does not change.

/// How a value is read as a whole, by a column or a `jsonb` column.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Whole {
    /// Not read as a whole: only the members below it that are wanted.
    #[default]
    No,
    /// Read by `jsonb` columns only, which take an array's or object's
    /// source text when it has one (see [`Json::source_text`]). When it has
    /// none, the value is built whole after all.
    ///
    /// [`Json::source_text`]: super::Json::source_text
    Text,
    /// Read as a value: built whole.
    Value,
}

/// The wanted parts of one value: a tree shaped like the pointers read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Wanted {
    pub(super) whole: Whole,
    /// Members wanted by name; the index is the name read as an array
    /// index, when it is one (a pointer token reaches both).
    pub(super) members: Vec<(String, Option<usize>, Wanted)>,
    /// Wanted in every item of an array (a `*` token).
    pub(super) items: Option<Box<Wanted>>,
}

/// What to build of a value.
#[derive(Debug, Clone, Copy)]
pub(super) enum Want<'w> {
    /// All of it.
    All,
    /// The parts `Wanted` names.
    Part(&'w Wanted),
}

impl Wanted {
    /// Everything: the whole document is built.
    pub fn everything() -> Wanted {
        Wanted {
            whole: Whole::Value,
            ..Wanted::default()
        }
    }

    /// Marks this value as read whole, `how`; the stronger reading counts.
    pub fn read_whole(&mut self, how: Whole) {
        self.whole = self.whole.max(how);
    }

    /// The member `key` (or the item `index`, in an array), added if new.
    pub fn member(&mut self, key: &str, index: Option<usize>) -> &mut Wanted {
        let at = match self.members.iter().position(|(name, ..)| name == key) {
            Some(at) => at,
            None => {
                self.members
                    .push((key.to_string(), index, Wanted::default()));
                self.members.len() - 1
            }
        };
        &mut self.members[at].2
    }

    /// What is wanted of every item of an array, added if new.
    pub fn items(&mut self) -> &mut Wanted {
        self.items.get_or_insert_default()
    }

    /// Adds everything `other` wants.
    pub fn merge(&mut self, other: &Wanted) {
        self.read_whole(other.whole);
        for (key, index, wanted) in &other.members {
            self.member(key, *index).merge(wanted);
        }
        if let Some(items) = &other.items {
            self.items().merge(items);
        }
    }

    /// Folds what `*` wants of an array's items into each item also
    /// wanted by its index, at every level, so that such an item is built
    /// for both. [`Wanted::of_item`] counts on it: call this once every
    /// pointer is in.
    pub fn settle(&mut self) {
        if let Some(items) = self.items.clone() {
            for (_, index, wanted) in &mut self.members {
                if index.is_some() {
                    wanted.merge(&items);
                }
            }
        }
        for (.., wanted) in &mut self.members {
            wanted.settle();
        }
        if let Some(items) = &mut self.items {
            items.settle();
        }
    }

    /// What to build of the member `key` of an object, if anything.
    pub(super) fn of_member(&self, key: &str) -> Option<Want<'_>> {
        self.members
            .iter()
            .find(|(name, ..)| name == key)
            .map(|(.., wanted)| wanted.want())
    }

    /// What to build of the item `index` of an array, if anything. An
    /// item wanted by its index also holds what `*` wants (see
    /// [`Wanted::settle`]).
    pub(super) fn of_item(&self, index: usize) -> Option<Want<'_>> {
        match self.members.iter().find(|(_, at, _)| *at == Some(index)) {
            Some((.., wanted)) => Some(wanted.want()),
            None => self.items.as_deref().map(Wanted::want),
        }
    }

    pub(super) fn want(&self) -> Want<'_> {
        match self.whole {
            Whole::Value => Want::All,
            _ => Want::Part(self),
        }
    }
}
