-- PostgreSQL's 0008 adds a stored `live` flag to grants so that their updates can stay in
-- place (HOT). SQLite has no such mechanism: its indexes keep their predicates. This file
-- keeps the two migration sequences numbered alike.
SELECT 1;
