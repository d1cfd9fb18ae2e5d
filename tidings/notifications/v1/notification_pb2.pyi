import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NotificationKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NOTIFICATION_KIND_UNSPECIFIED: _ClassVar[NotificationKind]
    NOTIFICATION_KIND_WELCOME: _ClassVar[NotificationKind]
    NOTIFICATION_KIND_PROFILE_UPDATED: _ClassVar[NotificationKind]
    NOTIFICATION_KIND_ACCOUNT_DELETED: _ClassVar[NotificationKind]
    NOTIFICATION_KIND_ORDER_CONFIRMED: _ClassVar[NotificationKind]
    NOTIFICATION_KIND_ORDER_REJECTED: _ClassVar[NotificationKind]
    NOTIFICATION_KIND_ORDER_CANCELLED: _ClassVar[NotificationKind]
NOTIFICATION_KIND_UNSPECIFIED: NotificationKind
NOTIFICATION_KIND_WELCOME: NotificationKind
NOTIFICATION_KIND_PROFILE_UPDATED: NotificationKind
NOTIFICATION_KIND_ACCOUNT_DELETED: NotificationKind
NOTIFICATION_KIND_ORDER_CONFIRMED: NotificationKind
NOTIFICATION_KIND_ORDER_REJECTED: NotificationKind
NOTIFICATION_KIND_ORDER_CANCELLED: NotificationKind

class Notification(_message.Message):
    __slots__ = ("id", "user_id", "kind", "title", "body", "source_event_id", "event_time", "create_time")
    ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    SOURCE_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_TIME_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    id: str
    user_id: str
    kind: NotificationKind
    title: str
    body: str
    source_event_id: str
    event_time: _timestamp_pb2.Timestamp
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., user_id: _Optional[str] = ..., kind: _Optional[_Union[NotificationKind, str]] = ..., title: _Optional[str] = ..., body: _Optional[str] = ..., source_event_id: _Optional[str] = ..., event_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
