"""The schema, as append-only named migrations.

Each migration is a name and its SQL statements; `{pk}`, `{bool}`, `{bigint}`, `{true}` and
`{false}` become each dialect's types (dialect.py), and a step whose statements differ gives
one list per dialect. The table `migrations` records what has been applied (name, time), so
a database at any earlier version is brought forward by applying the rest in order, each in
its own transaction. Never edit or reorder a migration that has shipped: append a new one.

Conventions: ids are text (uuid4 hex, or the ids an imported file brings); `n` is an integer
key that gives insertion order (and the full-text index's row id); times are ISO 8601 UTC
text with microseconds (sortable as text); JSON is stored as text.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    name: str
    common: tuple[str, ...] = ()     # statements for both dialects
    sqlite: tuple[str, ...] = ()     # then these on SQLite only
    postgresql: tuple[str, ...] = ()  # or these on PostgreSQL only

    def statements(self, dialect_name: str) -> list[str]:
        return list(self.common) + list(getattr(self, dialect_name))


MIGRATIONS: list[Migration] = [
    Migration("001_people", common=(
        """CREATE TABLE users (
            n {pk},
            id TEXT NOT NULL UNIQUE,
            username TEXT NOT NULL UNIQUE,
            password_hash TEXT,                       -- argon2id (PHC string); NULL: no login
            is_admin {bool} NOT NULL DEFAULT {false},
            share_feedback {bool} NOT NULL DEFAULT {false},  -- opted in to the admin export
            created_at TEXT NOT NULL)""",
        """CREATE TABLE sessions (
            token_hash TEXT PRIMARY KEY,              -- sha256 hex of the cookie's token
            user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            csrf_token TEXT NOT NULL,
            created_at TEXT NOT NULL,
            expires_at TEXT NOT NULL)""",
        "CREATE INDEX sessions_user ON sessions(user_id)",
        """CREATE TABLE login_attempts (
            key TEXT PRIMARY KEY,                     -- e.g. 'user:alice' or 'ip:10.0.0.2'
            failures INTEGER NOT NULL,
            window_start TEXT NOT NULL,
            locked_until TEXT)""",
    )),
    Migration("002_conversations", common=(
        """CREATE TABLE conversations (
            n {pk},
            id TEXT NOT NULL UNIQUE,
            user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            title TEXT NOT NULL DEFAULT '',
            model TEXT,
            system_prompt TEXT,
            sampling TEXT,                            -- JSON: SamplingParams fields
            current_leaf_id TEXT,                     -- the branch shown on reload
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL)""",
        "CREATE INDEX conversations_user ON conversations(user_id, updated_at)",
        """CREATE TABLE messages (
            n {pk},
            id TEXT NOT NULL UNIQUE,
            conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
            parent_id TEXT REFERENCES messages(id) ON DELETE CASCADE,
            role TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
            content TEXT NOT NULL,
            model TEXT,
            sampling TEXT,                            -- JSON
            seed {bigint},
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            timings TEXT,                             -- JSON: seconds and tokens/s
            finish_reason TEXT,
            incomplete {bool} NOT NULL DEFAULT {false},  -- still streaming, or cut off by a crash
            meta TEXT,                                -- JSON: imported oasst fields we keep as-is
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL)""",
        "CREATE INDEX messages_conversation ON messages(conversation_id, n)",
        "CREATE INDEX messages_parent ON messages(parent_id)",
        """CREATE TABLE ratings (
            n {pk},
            message_id TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
            user_id TEXT REFERENCES users(id) ON DELETE CASCADE,  -- NULL: an imported vote
            value INTEGER NOT NULL CHECK (value IN (-1, 1)),
            comment TEXT,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL)""",
        # one rating per user and message (imported anonymous votes, user NULL, are distinct)
        "CREATE UNIQUE INDEX ratings_user_message ON ratings(message_id, user_id)",
    )),
    Migration("003_search", sqlite=(
        """CREATE VIRTUAL TABLE message_fts USING fts5(content, content='messages',
            content_rowid='n', tokenize='unicode61 remove_diacritics 0')""",
        """CREATE TRIGGER message_fts_insert AFTER INSERT ON messages BEGIN
            INSERT INTO message_fts(rowid, content) VALUES (new.n, new.content); END""",
        """CREATE TRIGGER message_fts_delete AFTER DELETE ON messages BEGIN
            INSERT INTO message_fts(message_fts, rowid, content)
            VALUES ('delete', old.n, old.content); END""",
        """CREATE TRIGGER message_fts_update AFTER UPDATE OF content ON messages BEGIN
            INSERT INTO message_fts(message_fts, rowid, content)
            VALUES ('delete', old.n, old.content);
            INSERT INTO message_fts(rowid, content) VALUES (new.n, new.content); END""",
        "INSERT INTO message_fts(message_fts) VALUES ('rebuild')",
        """CREATE VIRTUAL TABLE conversation_fts USING fts5(title, content='conversations',
            content_rowid='n', tokenize='unicode61 remove_diacritics 0')""",
        """CREATE TRIGGER conversation_fts_insert AFTER INSERT ON conversations BEGIN
            INSERT INTO conversation_fts(rowid, title) VALUES (new.n, new.title); END""",
        """CREATE TRIGGER conversation_fts_delete AFTER DELETE ON conversations BEGIN
            INSERT INTO conversation_fts(conversation_fts, rowid, title)
            VALUES ('delete', old.n, old.title); END""",
        """CREATE TRIGGER conversation_fts_update AFTER UPDATE OF title ON conversations BEGIN
            INSERT INTO conversation_fts(conversation_fts, rowid, title)
            VALUES ('delete', old.n, old.title);
            INSERT INTO conversation_fts(rowid, title) VALUES (new.n, new.title); END""",
        "INSERT INTO conversation_fts(conversation_fts) VALUES ('rebuild')",
    ), postgresql=(
        "CREATE INDEX message_fts ON messages USING gin (to_tsvector('simple', content))",
        "CREATE INDEX conversation_fts ON conversations USING gin (to_tsvector('simple', title))",
    )),
    # login throttling per (username, client address), with a lockout count for the growing
    # back-off; the old per-username / per-address rows are dropped (locks are transient)
    Migration("004_login_pairs", common=(
        "DELETE FROM login_attempts",
        "ALTER TABLE login_attempts ADD COLUMN username TEXT",
        "ALTER TABLE login_attempts ADD COLUMN address TEXT",
        "ALTER TABLE login_attempts ADD COLUMN lockouts INTEGER NOT NULL DEFAULT 0",
        "CREATE INDEX login_attempts_username ON login_attempts(username)",
    )),
    # the first-run setup's admin: one row at most, so concurrent setups make one admin
    Migration("005_first_admin", common=(
        """CREATE TABLE first_admin (
            one INTEGER PRIMARY KEY CHECK (one = 1),
            user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            created_at TEXT NOT NULL)""",
    )),
    # the web app's arena (store/arena.py): blind battles of two served models on one prompt;
    # the models stay hidden from the user until the battle's one vote
    Migration("006_arena", common=(
        """CREATE TABLE battles (
            n {pk},
            id TEXT NOT NULL UNIQUE,                  -- random (uuid4 hex): says nothing
            user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            prompt TEXT NOT NULL,
            model_a TEXT NOT NULL,                    -- shown to the user only once voted
            model_b TEXT NOT NULL,
            reply_a TEXT NOT NULL DEFAULT '',
            reply_b TEXT NOT NULL DEFAULT '',
            finish_a TEXT,                            -- finish_reason; NULL while streaming
            finish_b TEXT,
            tokens_a INTEGER,                         -- completion tokens
            tokens_b INTEGER,
            seed_a {bigint},
            seed_b {bigint},
            sampling TEXT,                            -- JSON: the settings both sides used
            vote TEXT CHECK (vote IN ('a', 'b', 'tie', 'both_bad')),  -- NULL: not voted yet
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            voted_at TEXT)""",
        "CREATE INDEX battles_user ON battles(user_id, n)",
        "CREATE INDEX battles_voted ON battles(voted_at)",
    )),
    # Open Assistant-style volunteer collection (homellm/collect/, store/collect_trees.py and
    # store/collect_tasks.py): message trees grown, reviewed and ranked by volunteers; roles
    # (`role`: volunteer | moderator; an admin is `is_admin`) and bans on users
    Migration("007_collect", common=(
        "ALTER TABLE users ADD COLUMN role TEXT NOT NULL DEFAULT 'volunteer'",
        "ALTER TABLE users ADD COLUMN banned {bool} NOT NULL DEFAULT {false}",
        """CREATE TABLE collect_prefs (
            user_id TEXT PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
            langs TEXT NOT NULL DEFAULT '[]',         -- JSON: language tags; []: any
            tags TEXT NOT NULL DEFAULT '[]',          -- JSON: topics preferred
            updated_at TEXT NOT NULL)""",
        """CREATE TABLE collect_trees (
            n {pk},
            id TEXT NOT NULL UNIQUE,                  -- the prompt's message id
            state TEXT NOT NULL,                      -- initial_prompt_review, growing, ...
            lang TEXT,
            tags TEXT NOT NULL DEFAULT '[]',          -- JSON: the prompt's topics
            origin TEXT,
            goal_size INTEGER NOT NULL,
            max_depth INTEGER NOT NULL,
            max_children INTEGER NOT NULL,
            extra TEXT,                               -- JSON: an imported tree's other fields
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL)""",
        "CREATE INDEX collect_trees_state ON collect_trees(state, n)",
        """CREATE TABLE collect_messages (
            n {pk},
            id TEXT NOT NULL UNIQUE,
            tree_id TEXT NOT NULL REFERENCES collect_trees(id) ON DELETE CASCADE,
            parent_id TEXT REFERENCES collect_messages(id) ON DELETE CASCADE,
            depth INTEGER NOT NULL,                   -- the prompt is 0
            role TEXT NOT NULL CHECK (role IN ('prompter', 'assistant')),
            text TEXT NOT NULL,
            lang TEXT,
            user_id TEXT REFERENCES users(id) ON DELETE SET NULL,   -- the local author
            author TEXT,                              -- the exported user_id (imported: theirs)
            review_count INTEGER NOT NULL DEFAULT 0,
            review_result {bool},                     -- NULL: still in review
            deleted {bool} NOT NULL DEFAULT {false},
            rank INTEGER,                             -- 0 = best of its siblings
            ranking_count INTEGER NOT NULL DEFAULT 0,
            synthetic {bool} NOT NULL DEFAULT {false},
            model_name TEXT,
            imported TEXT,                            -- JSON: labels, emojis, events, ... as read
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL)""",
        "CREATE INDEX collect_messages_tree ON collect_messages(tree_id, n)",
        "CREATE INDEX collect_messages_parent ON collect_messages(parent_id)",
        "CREATE INDEX collect_messages_user ON collect_messages(user_id, created_at)",
        """CREATE TABLE collect_tasks (
            n {pk},
            id TEXT NOT NULL UNIQUE,
            kind TEXT NOT NULL,
            user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            tree_id TEXT REFERENCES collect_trees(id) ON DELETE CASCADE,
            target_id TEXT,                           -- the message (or edit) it is about
            payload TEXT NOT NULL,                    -- JSON: what the volunteer was shown
            status TEXT NOT NULL CHECK (status IN ('reserved', 'done', 'skipped', 'cancelled')),
            created_at TEXT NOT NULL,
            expires_at TEXT NOT NULL,
            done_at TEXT)""",
        "CREATE INDEX collect_tasks_target ON collect_tasks(target_id, status, expires_at)",
        "CREATE INDEX collect_tasks_user ON collect_tasks(user_id, status, expires_at)",
        "CREATE INDEX collect_tasks_tree ON collect_tasks(tree_id, status)",
        """CREATE TABLE collect_reviews (
            n {pk},
            task_id TEXT REFERENCES collect_tasks(id) ON DELETE SET NULL,
            message_id TEXT NOT NULL REFERENCES collect_messages(id) ON DELETE CASCADE,
            user_id TEXT REFERENCES users(id) ON DELETE SET NULL,
            labels TEXT NOT NULL,                     -- JSON: label name -> value (0 to 1)
            mode TEXT NOT NULL,                       -- full | simple
            created_at TEXT NOT NULL)""",
        "CREATE UNIQUE INDEX collect_reviews_once ON collect_reviews(message_id, user_id)",
        "CREATE INDEX collect_reviews_user ON collect_reviews(user_id, created_at)",
        """CREATE TABLE collect_rankings (
            n {pk},
            task_id TEXT REFERENCES collect_tasks(id) ON DELETE SET NULL,
            parent_id TEXT REFERENCES collect_messages(id) ON DELETE CASCADE,  -- NULL: prompts
            user_id TEXT REFERENCES users(id) ON DELETE SET NULL,
            ranked_ids TEXT NOT NULL,                 -- JSON: message ids, best first
            ranking TEXT NOT NULL,                    -- JSON: the indices as submitted
            not_rankable {bool} NOT NULL DEFAULT {false},  -- "all replies are bad"
            created_at TEXT NOT NULL)""",
        "CREATE UNIQUE INDEX collect_rankings_once ON collect_rankings(parent_id, user_id)",
        "CREATE INDEX collect_rankings_user ON collect_rankings(user_id, created_at)",
        """CREATE TABLE collect_emojis (
            message_id TEXT NOT NULL REFERENCES collect_messages(id) ON DELETE CASCADE,
            user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            emoji TEXT NOT NULL,                      -- +1, -1, red_flag, _skip_reply, ...
            created_at TEXT NOT NULL,
            PRIMARY KEY (message_id, user_id, emoji))""",
        "CREATE INDEX collect_emojis_user ON collect_emojis(user_id, emoji)",
        """CREATE TABLE collect_reports (
            n {pk},
            id TEXT NOT NULL UNIQUE,
            message_id TEXT NOT NULL REFERENCES collect_messages(id) ON DELETE CASCADE,
            user_id TEXT REFERENCES users(id) ON DELETE SET NULL,
            reason TEXT NOT NULL,
            created_at TEXT NOT NULL,
            resolved_at TEXT,
            resolved_by TEXT)""",
        """CREATE TABLE collect_edits (
            n {pk},
            id TEXT NOT NULL UNIQUE,
            message_id TEXT NOT NULL REFERENCES collect_messages(id) ON DELETE CASCADE,
            tree_id TEXT NOT NULL REFERENCES collect_trees(id) ON DELETE CASCADE,
            user_id TEXT REFERENCES users(id) ON DELETE SET NULL,
            text TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('pending', 'accepted', 'rejected')),
            approvals INTEGER NOT NULL DEFAULT 0,
            rejections INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL,
            decided_at TEXT)""",
        "CREATE INDEX collect_edits_status ON collect_edits(status, n)",
        """CREATE TABLE collect_edit_votes (
            edit_id TEXT NOT NULL REFERENCES collect_edits(id) ON DELETE CASCADE,
            user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            task_id TEXT REFERENCES collect_tasks(id) ON DELETE SET NULL,
            approve {bool} NOT NULL,
            created_at TEXT NOT NULL,
            PRIMARY KEY (edit_id, user_id))""",
        """CREATE TABLE collect_revisions (
            n {pk},
            message_id TEXT NOT NULL REFERENCES collect_messages(id) ON DELETE CASCADE,
            text TEXT NOT NULL,                       -- the text before the edit
            edit_id TEXT,
            created_at TEXT NOT NULL)""",
        """CREATE TABLE collect_log (
            n {pk},
            user_id TEXT REFERENCES users(id) ON DELETE SET NULL,   -- the moderator
            action TEXT NOT NULL,
            target TEXT NOT NULL,
            detail TEXT,
            created_at TEXT NOT NULL)""",
    )),
    # the live reservations of a kind (the count of new trees that may start), without a scan
    Migration("008_collect_live_tasks", common=(
        "CREATE INDEX collect_tasks_live ON collect_tasks(kind, expires_at) "
        "WHERE status = 'reserved'",
    )),
    # the web app (store/preferences.py): each user's defaults for new chats, a comment on a
    # reply without a thumb, and "which is better?" between sibling replies (preference pairs)
    Migration("009_web_preferences", common=(
        """CREATE TABLE user_settings (
            user_id TEXT PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
            settings TEXT NOT NULL,                   -- JSON: model, system_prompt, sampling
            updated_at TEXT NOT NULL)""",
        """CREATE TABLE message_comments (
            message_id TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
            user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            comment TEXT NOT NULL,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (message_id, user_id))""",
        """CREATE TABLE preferences (
            n {pk},
            user_id TEXT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            parent_id TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
            chosen_id TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
            rejected_id TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
            created_at TEXT NOT NULL)""",
        "CREATE UNIQUE INDEX preferences_pair ON preferences(user_id, chosen_id, rejected_id)",
        "CREATE INDEX preferences_parent ON preferences(parent_id)",
    )),
    # the live reservations of a target and of a tree (store/collect_tasks.py's candidate
    # queries count them for every candidate; by kind alone each count scanned them all)
    Migration("010_collect_live_targets", common=(
        "CREATE INDEX collect_tasks_live_target ON collect_tasks(target_id, kind, expires_at) "
        "WHERE status = 'reserved'",
        "CREATE INDEX collect_tasks_live_tree ON collect_tasks(tree_id, kind, expires_at) "
        "WHERE status = 'reserved'",
    )),
]
