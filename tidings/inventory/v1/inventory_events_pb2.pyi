from tidings.events.v1 import options_pb2 as _options_pb2
from tidings.inventory.v1 import product_pb2 as _product_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StockRejectionReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STOCK_REJECTION_REASON_UNSPECIFIED: _ClassVar[StockRejectionReason]
    STOCK_REJECTION_REASON_INSUFFICIENT_STOCK: _ClassVar[StockRejectionReason]
    STOCK_REJECTION_REASON_UNKNOWN_PRODUCT: _ClassVar[StockRejectionReason]
    STOCK_REJECTION_REASON_ORDER_CLOSED: _ClassVar[StockRejectionReason]
STOCK_REJECTION_REASON_UNSPECIFIED: StockRejectionReason
STOCK_REJECTION_REASON_INSUFFICIENT_STOCK: StockRejectionReason
STOCK_REJECTION_REASON_UNKNOWN_PRODUCT: StockRejectionReason
STOCK_REJECTION_REASON_ORDER_CLOSED: StockRejectionReason

class StockReserved(_message.Message):
    __slots__ = ("reservation",)
    RESERVATION_FIELD_NUMBER: _ClassVar[int]
    reservation: _product_pb2.Reservation
    def __init__(self, reservation: _Optional[_Union[_product_pb2.Reservation, _Mapping]] = ...) -> None: ...

class StockRejected(_message.Message):
    __slots__ = ("order_id", "reason", "detail")
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    order_id: str
    reason: StockRejectionReason
    detail: str
    def __init__(self, order_id: _Optional[str] = ..., reason: _Optional[_Union[StockRejectionReason, str]] = ..., detail: _Optional[str] = ...) -> None: ...

class StockReleased(_message.Message):
    __slots__ = ("reservation",)
    RESERVATION_FIELD_NUMBER: _ClassVar[int]
    reservation: _product_pb2.Reservation
    def __init__(self, reservation: _Optional[_Union[_product_pb2.Reservation, _Mapping]] = ...) -> None: ...
