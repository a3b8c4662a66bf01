"""The study storage: SQLite or a database server, with heartbeats, and its errors in one line."""
from __future__ import annotations

import contextlib
import errno
import logging
import re
import warnings

from pipeline.errors import ConfigError, PipelineError

log = logging.getLogger("sweeps.optuna")


def redact(url: str) -> str:
    """The storage URL without its password (it goes into logs and run records)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


@contextlib.contextmanager
def storage_errors(spec):
    """Turn a locked, unreachable or full storage into one line naming it, instead of a traceback."""
    import sqlalchemy.exc

    where = redact(spec.storage_url)
    try:
        yield
    except sqlalchemy.exc.OperationalError as err:
        first = (str(getattr(err, "orig", None) or err).strip().splitlines() or ["?"])[0]
        if "locked" in first:
            raise PipelineError(f"{where}: the study storage stayed locked by another process for "
                                f"{spec.lock_timeout:g}s (--lock-timeout); is another sweep writing it?") from None
        if ("disk" in first and "full" in first) or "no space left" in first.lower():
            raise PipelineError(f"{where}: disk full; free space and rerun the same command to resume") from None
        raise PipelineError(f"{where}: cannot use the study storage: {first}") from None
    except ImportError as err:
        raise PipelineError(f"{where}: no database driver ({err}); "
                            "install it, e.g. pip install 'psycopg[binary]'") from None
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise PipelineError(f"disk full writing {err.filename or 'sweep output'}; "
                                "free space and rerun to resume") from None
        raise


def make_storage(spec):
    """An RDBStorage with heartbeats: a trial whose worker stops beating is failed and queued again."""
    import optuna
    from optuna.storages import RDBStorage

    url = spec.storage_url
    dialect = url.split(":", 1)[0].split("+")[0]
    if dialect == "sqlite":  # wait for a lock this long, then fail with a clear line instead of hanging
        engine_kwargs = {"connect_args": {"timeout": spec.lock_timeout}}
    elif dialect == "postgresql":
        engine_kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": max(1, int(spec.lock_timeout))}}
    elif dialect == "mysql":
        engine_kwargs = {"pool_pre_ping": True}
    else:
        raise ConfigError(f"--storage {redact(url)}: use sqlite:///FILE, postgresql://USER@HOST/DB or mysql://...")
    # Optuna >= 4.9 renamed the retry callback and its keyword; accept both.
    retry_cls = (getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
                 or optuna.storages.RetryFailedTrialCallback)
    keyword = ("heartbeat_stale_trial_callback"
               if "heartbeat_stale_trial_callback" in RDBStorage.__init__.__code__.co_varnames
               else "failed_trial_callback")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 'experimental' in Optuna's terms since 2.8
        retry = retry_cls(max_retry=spec.max_retry, inherit_intermediate_values=True)

    def on_stale(study, trial) -> None:
        from pipeline.tracking import update_record

        run_dir = trial.user_attrs.get("run_dir")
        if run_dir and update_record(run_dir, status="failed", error=(
                f"WorkerLost: no heartbeat from {trial.user_attrs.get('worker', 'its worker')} for "
                f"{spec.grace_period or 2 * spec.heartbeat_interval}s; trial {trial.number} failed and queued again")):
            log.warning("trial %d lost its worker; marked failed and queued again", trial.number)
        retry(study, trial)

    with storage_errors(spec), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # heartbeats too
        return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=spec.heartbeat_interval,
                          grace_period=spec.grace_period, **{keyword: on_stale})
