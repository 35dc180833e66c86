"""Redis URLs: the redis+sentinel:// form read exactly or refused in one line, passwords masked,
and the client each form gives (no server needed: redis-py connects lazily)."""

from __future__ import annotations

import pytest

from worker.errors import ConfigError
from worker.redis_conn import RedisUrlError, SentinelTarget, is_sentinel_url, parse_sentinel_url, redis_client
from worker.settings import load_settings
from worker.urls import display_url


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith(("KEYROTOR_", "VAULT_")):
            monkeypatch.delenv(name, raising=False)


def test_a_full_sentinel_url_is_read_as_written() -> None:
    target = parse_sentinel_url("redis+sentinel://app:m%40ster-s3cret@s1.example:26380,10.0.0.2,[::1]:5000"
                                "/prod-master/3?sentinel_password=sent%2Cinel-s3cret")
    assert target == SentinelTarget(sentinels=(("s1.example", 26380), ("10.0.0.2", 26379), ("::1", 5000)),
                                    master_name="prod-master", db=3, username="app", password="m@ster-s3cret",
                                    sentinel_password="sent,inel-s3cret")
    assert "s3cret" not in repr(target)


def test_a_minimal_sentinel_url_defaults_port_and_database() -> None:
    target = parse_sentinel_url("redis+sentinel://sentinel/mymaster")
    assert (target.sentinels, target.master_name, target.db) == ((("sentinel", 26379),), "mymaster", 0)
    assert target.password is None and target.username is None and target.sentinel_password is None
    assert parse_sentinel_url("redis+sentinel://:pw@h/m/").password == "pw"
    assert is_sentinel_url("REDIS+SENTINEL://h/m") and not is_sentinel_url("redis://h/0")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis+sentinel:///mymaster", "no sentinel address"),
        ("redis+sentinel://h1:26379", "no master name after the sentinels"),
        ("redis+sentinel://h1:26379/", "no master name after the sentinels"),
        ("redis+sentinel://h1:26379/m/abc", "the database 'abc' after the master name is not a number"),
        ("redis+sentinel://h1:26379/m/0/extra", "too many path parts"),
        ("redis+sentinel://h1:port/m", "sentinel port 'port' of h1 is not a number"),
        ("redis+sentinel://h1:0/m", "sentinel port '0' of h1 is not a number between 1 and 65535"),
        ("redis+sentinel://h1:70000/m", "is not a number between 1 and 65535"),
        ("redis+sentinel://h1,,h2/m", "sentinel address '' is not HOST[:PORT]"),
        ("redis+sentinel://h1;h2/m", "is not HOST[:PORT]; separate sentinels with commas"),
        ("redis+sentinel://s3cret@h1/m", "give the master's password as :PASSWORD@"),
        ("redis+sentinel://h1/m?db=2", "unknown query parameter 'db'; the only one is sentinel_password"),
        ("redis+sentinel://h1/m?sentinel_password=a&sentinel_password=b", "sentinel_password is given twice"),
        ("redis+sentinel://:s3cret@h1/m#x", "has no #fragment"),
        ("sentinel://h1/m", "expected redis://HOST:PORT/DB"),
    ],
)
def test_a_bad_sentinel_url_is_one_line_naming_the_part(monkeypatch: pytest.MonkeyPatch, url: str,
                                                        expected: str) -> None:
    monkeypatch.setenv("KEYROTOR_REDIS_URL", url)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert message.startswith("KEYROTOR_REDIS_URL: ") and expected in message, message
    assert "\n" not in message and "s3cret" not in message


def test_settings_accept_the_sentinel_form(monkeypatch: pytest.MonkeyPatch) -> None:
    url = "redis+sentinel://:pw@s1:26379,s2:26379,s3:26379/mymaster/2?sentinel_password=spw"
    monkeypatch.setenv("KEYROTOR_REDIS_URL", url)
    assert load_settings().redis_url == url


def test_parse_raises_the_value_error_settings_report() -> None:
    with pytest.raises(RedisUrlError):
        parse_sentinel_url("redis://h/0")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@h:6379/0", "redis://:***@h:6379/0"),
        ("redis://user:s3cret@h:6379/0", "redis://user:***@h:6379/0"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("unix:///run/redis.sock?db=2", "unix:///run/redis.sock?db=2"),
        ("redis+sentinel://:s3cret@s1:26379,s2:26379/m/0?sentinel_password=s3cret",
         "redis+sentinel://:***@s1:26379,s2:26379/m/0?sentinel_password=***"),
    ],
)
def test_display_url_masks_every_password(url: str, shown: str) -> None:
    assert display_url(url) == shown


def test_the_sentinel_client_asks_the_sentinels_for_the_master_with_both_passwords() -> None:
    client = redis_client("redis+sentinel://app:mpw@s1:26380,s2/mymaster/4?sentinel_password=spw",
                          socket_timeout=3.0, socket_connect_timeout=1.0, health_check_interval=30)
    pool = client.connection_pool
    assert pool.service_name == "mymaster" and pool.is_master
    kwargs = pool.connection_kwargs
    assert (kwargs["db"], kwargs["username"], kwargs["password"]) == (4, "app", "mpw")
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"], kwargs["health_check_interval"]) == (3.0, 1.0, 30)
    sentinels = pool.sentinel_manager.sentinels
    assert [(s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"])
            for s in sentinels] == [("s1", 26380), ("s2", 26379)]
    assert {s.connection_pool.connection_kwargs.get("password") for s in sentinels} == {"spw"}
    assert {s.connection_pool.connection_kwargs.get("socket_timeout") for s in sentinels} == {3.0}


def test_a_plain_url_keeps_redis_py_s_reading_and_gets_the_timeouts() -> None:
    client = redis_client("redis://:pw@h:6390/5", socket_timeout=2.0)
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"], kwargs["password"]) == ("h", 6390, 5, "pw")
    assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 2.0


def test_the_broker_is_built_on_that_client() -> None:
    # Dramatiq's url= builds its own pool and drops socket options; the client keeps them.
    from worker.runtime.broker import make_redis_broker

    broker = make_redis_broker("redis+sentinel://s1/mymaster/1", "ns")
    assert broker.client.connection_pool.service_name == "mymaster"
    assert broker.client.connection_pool.connection_kwargs["socket_timeout"] == 30
    plain = make_redis_broker("redis://h:6390/2", "ns")
    assert plain.client.connection_pool.connection_kwargs["socket_timeout"] == 30
