import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OrderState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ORDER_STATE_UNSPECIFIED: _ClassVar[OrderState]
    ORDER_STATE_PENDING: _ClassVar[OrderState]
    ORDER_STATE_AWAITING_PAYMENT: _ClassVar[OrderState]
    ORDER_STATE_CONFIRMED: _ClassVar[OrderState]
    ORDER_STATE_REJECTED: _ClassVar[OrderState]
    ORDER_STATE_CANCELLED: _ClassVar[OrderState]

class RejectionReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REJECTION_REASON_UNSPECIFIED: _ClassVar[RejectionReason]
    REJECTION_REASON_OUT_OF_STOCK: _ClassVar[RejectionReason]
    REJECTION_REASON_UNKNOWN_PRODUCT: _ClassVar[RejectionReason]
    REJECTION_REASON_INSUFFICIENT_FUNDS: _ClassVar[RejectionReason]
    REJECTION_REASON_TIMEOUT: _ClassVar[RejectionReason]
ORDER_STATE_UNSPECIFIED: OrderState
ORDER_STATE_PENDING: OrderState
ORDER_STATE_AWAITING_PAYMENT: OrderState
ORDER_STATE_CONFIRMED: OrderState
ORDER_STATE_REJECTED: OrderState
ORDER_STATE_CANCELLED: OrderState
REJECTION_REASON_UNSPECIFIED: RejectionReason
REJECTION_REASON_OUT_OF_STOCK: RejectionReason
REJECTION_REASON_UNKNOWN_PRODUCT: RejectionReason
REJECTION_REASON_INSUFFICIENT_FUNDS: RejectionReason
REJECTION_REASON_TIMEOUT: RejectionReason

class LineItem(_message.Message):
    __slots__ = ("product_id", "quantity")
    PRODUCT_ID_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    product_id: str
    quantity: int
    def __init__(self, product_id: _Optional[str] = ..., quantity: _Optional[int] = ...) -> None: ...

class Order(_message.Message):
    __slots__ = ("id", "user_id", "line_items", "state", "total_cents", "rejection_reason", "status_detail", "create_time", "update_time")
    ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    LINE_ITEMS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_CENTS_FIELD_NUMBER: _ClassVar[int]
    REJECTION_REASON_FIELD_NUMBER: _ClassVar[int]
    STATUS_DETAIL_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    id: str
    user_id: str
    line_items: _containers.RepeatedCompositeFieldContainer[LineItem]
    state: OrderState
    total_cents: int
    rejection_reason: RejectionReason
    status_detail: str
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., user_id: _Optional[str] = ..., line_items: _Optional[_Iterable[_Union[LineItem, _Mapping]]] = ..., state: _Optional[_Union[OrderState, str]] = ..., total_cents: _Optional[int] = ..., rejection_reason: _Optional[_Union[RejectionReason, str]] = ..., status_detail: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
