-- Run once on the database host (PostgreSQL >= 15): sudo -u postgres psql -f postgres.sql
-- A role that owns its database and nothing else; wacored creates and migrates its tables at the first
-- node's start (under an advisory lock, so two nodes starting together migrate once).
-- Set the password from a secret store instead of this file: \password wacored
CREATE ROLE wacored LOGIN PASSWORD 'CHANGE-ME';
CREATE DATABASE wacored OWNER wacored ENCODING 'UTF8';
REVOKE ALL ON DATABASE wacored FROM PUBLIC;
