import codestation
from codestation import errors


def all_errors() -> list[type[errors.CodestationError]]:
    found, pending = [], [errors.CodestationError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


def test_every_error_has_its_own_code_and_maps_back() -> None:
    classes = [c for c in all_errors() if c.__module__ == "codestation.errors"]
    codes = [c.code for c in classes]
    assert len(codes) == len(set(codes))
    for cls in classes:
        assert errors.error_for_code(cls.code) is cls
    assert errors.error_for_code("from_a_newer_server") is errors.CodestationError


def test_client_mistakes_are_4xx_and_service_conditions_5xx() -> None:
    assert errors.WorkspaceRejected.status_code == 400
    assert errors.UnknownEnvironment.status_code == 400
    assert errors.SessionNotFound.status_code == 404
    assert errors.NoFreePort.status_code == 503


def test_public_names_are_exported() -> None:
    for name in codestation.__all__:
        assert hasattr(codestation, name), name
    public = {n for n in dir(codestation) if not n.startswith("_") and n[0].isupper()}
    assert public <= set(codestation.__all__)
