"""Entry point of the users service process (``python -m services.users.main``)."""

from __future__ import annotations

from collections.abc import Sequence

from services.runtime.service import Runtime, ServicerBinding, ServiceSpec, run
from services.runtime.streams import USERS
from services.users import store
from services.users.servicer import UserServicer
from tidings.users.v1 import user_service_pb2, user_service_pb2_grpc


def servicers(runtime: Runtime) -> Sequence[ServicerBinding]:
    """Bind UserService to the runtime."""
    name = user_service_pb2.DESCRIPTOR.services_by_name["UserService"].full_name
    return [(user_service_pb2_grpc.add_UserServiceServicer_to_server, UserServicer(runtime), name)]


SPEC = ServiceSpec(name="users", metadata=store.metadata, servicers=servicers, streams=(USERS,))


def main() -> None:
    """Run the users service until SIGTERM or SIGINT."""
    run(SPEC)


if __name__ == "__main__":
    main()
