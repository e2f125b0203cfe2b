"""The pack's version, recorded in every plan it writes (kept apart so that nothing imports the
package root for it)."""

__version__ = "0.1.0"
