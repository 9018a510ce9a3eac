"""Local fakes of the billing providers' HTTP APIs, for tests."""

from .base import FakeServer, Request, Response
from .chargebee import FakeChargebee
from .ingest import FakeLago, FakeOpenMeter
from .metronome import FakeMetronome
from .recurly import FakeRecurly
from .stripe import FakeStripe

__all__ = ["FakeServer", "Request", "Response", "FakeStripe",
           "FakeChargebee", "FakeRecurly", "FakeOpenMeter", "FakeLago",
           "FakeMetronome"]
