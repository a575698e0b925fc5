"""Unit and property tests: no daemon, no sudo, no real users."""
